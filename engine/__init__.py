"""The engine: stages, the job runner and everything that does work. Never imports gradio."""

import os

# PyTorch's CPU wheels use GNU OpenMP, whose threads spin ~300k iterations before sleeping. On a small machine shared
# with the web app, the engine and a browser, two spinning threads made a training step 60x slower (6.3 s vs 0.1 s,
# measured on 2 cores with two busy processes beside it); a short spin keeps the idle speed (0.09 s) and stays
# usable under load (0.5 s). Set before torch is imported by any engine process; a user's own value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
