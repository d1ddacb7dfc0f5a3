"""Where things live on disk. One workspace = one SQLite file + run directories + caches.

    workspace/
      studio.db                      all state (runs, jobs, metrics, evals, artifacts, servers)
      engine.log                     the background engine's own log
      cache/                         deterministic, shareable: the embedded base model, compiled CUDA extensions
      runs/<run_id>/
        models/<stage>[-<fmt>]/      stage outputs: whole HF model dirs (full fine-tuning), or adapters / quantizers
                                     with a pointer to the parent stage (LoRA, PTQ; engine/training/stage_outputs.py)
        checkpoints/<stage>[-<fmt>]/ resumable trainer checkpoints
        exports/<fmt>/               real FP4 checkpoints
        logs/<job_id>-<stage>.log    each job's stdout+stderr (a file, never a pipe someone must drain)
        summary.json                 the results table
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "assets"
DB_NAME = "studio.db"


def resolve_workdir(workdir: str | Path | None = None) -> Path:
    """--workdir, else $QAT_STUDIO_HOME, else ./workspace."""
    chosen = workdir or os.environ.get("QAT_STUDIO_HOME") or "workspace"
    return Path(chosen).expanduser().resolve()


def db_path(workdir: Path) -> Path:
    return workdir / DB_NAME


def cache_dir(workdir: Path) -> Path:
    """Deterministic caches (the embedded base model, compiled extensions); $QAT_STUDIO_CACHE shares one
    between workspaces (the tests do, so the base model is pre-trained once per test session)."""
    shared = os.environ.get("QAT_STUDIO_CACHE")
    return Path(shared).expanduser().resolve() if shared else workdir / "cache"


def run_dir(workdir: Path, run_id: str) -> Path:
    return workdir / "runs" / run_id


def stage_key(stage: str, fmt: str | None = None) -> str:
    """'sft', 'ptq-mxfp4', ...: the directory name of a stage's output."""
    return stage if not fmt or fmt == "bf16" else f"{stage}-{fmt}"


def model_dir(run_root: Path, stage: str, fmt: str | None = None) -> Path:
    return run_root / "models" / stage_key(stage, fmt)


def checkpoint_dir(run_root: Path, stage: str, fmt: str | None = None) -> Path:
    return run_root / "checkpoints" / stage_key(stage, fmt)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` dir (the Trainer writes `trainer_state.json` last)."""
    if not output_dir.exists():
        return None
    found = []
    for child in output_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir() and (child / "trainer_state.json").exists():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


NO_CHECKPOINT = "no checkpoint yet: restarting from step 0"


def resume_point(run_root: Path, stage: str, fmt: str | None = None) -> str:
    """Where a resumed training job of this stage continues: its newest checkpoint, or step 0 (said plainly: the
    steps it had trained are lost)."""
    found = latest_checkpoint(checkpoint_dir(run_root, stage, fmt))
    return f"continues from {found.name}" if found else NO_CHECKPOINT


def export_dir(run_root: Path, fmt: str) -> Path:
    return run_root / "exports" / fmt


def log_path(run_root: Path, job_id: int, stage: str, fmt: str | None = None) -> Path:
    return run_root / "logs" / f"{job_id}-{stage_key(stage, fmt)}.log"


def setup_extension_cache(workdir: Path) -> None:
    """Keep modelopt's JIT-compiled CUDA extensions (~90 s to build on first use) in the workspace."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir(workdir) / "torch_extensions"))


def model_path(run_root: Path, key: str) -> Path:
    """Where the stage with job key `key` keeps its model. 'prepare' points at the resolved base model."""
    if key == "prepare":
        pointer = run_root / "models" / "base.json"
        if not pointer.exists():
            raise FileNotFoundError(f"{pointer}: the prepare stage has not run for this run")
        return Path(json.loads(pointer.read_text())["path"])
    stage, _, fmt = key.partition(":")
    return run_root / "models" / stage_key(stage, fmt or None)


def write_base_pointer(run_root: Path, path: Path | str, meta: dict) -> None:
    pointer = run_root / "models" / "base.json"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps({"path": str(path), **meta}, indent=2))
    os.replace(tmp, pointer)
