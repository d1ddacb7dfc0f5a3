"""Deploy + Chat in a real browser: the app (`python launch.py`) in a subprocess, headless Debian chromium via
Playwright. The workspace holds one run with real MXFP4, NVFP4 and NVFP4 W4A4 exports of the tiny base model (PTQ
in this process). The Deploy tab offers first what transformers can serve (the NVFP4 export, through its dequantized
copy) and last, marked, what it cannot (W4A4, though newest); picking W4A4 disables Start and shows the error icon;
a typed path (the unquantized base) works too. It serves the NVFP4 and the MXFP4 exports, and the Chat tab asks both
side by side (compare mode): the replies stream (text grew over several renders) with their analysis apart and
TTFT / tokens/s under them, and the embedded-demo note says to start a new chat for each question. Then it stops
every server from the Deploy tab and checks no server process is left.
"""

from __future__ import annotations

import re
import time

import pytest

from engine.serving import server_process
from engine.runtime.workspace import REPO_ROOT, db_path
from tests.browser_app import open_page, running_app

pytestmark = pytest.mark.slow
SHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
# Every render of the chatbot: (ms since the observer started, text length of its last answer).
OBSERVE = """() => { window.__lengths = []; const t0 = performance.now();
  const root = document.querySelector('#chat-a');
  const note = () => { const bots = root.querySelectorAll('.bot, [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    window.__lengths.push([performance.now() - t0, text.length]); };
  new MutationObserver(note).observe(root, {subtree: true, childList: true, characterData: true}); }"""


def run_with_exports(workdir, base) -> dict[str, str]:
    """A run whose exports are real checkpoints: the tiny base PTQ-quantized to each format (calibrated on two
    prompts), written by the app's exporters, registered as the export stage registers them (W4A4 last: newest)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.fp4 import modelopt_glue
    from engine.fp4.export_mxfp4 import export_mxfp4
    from engine.fp4.export_nvfp4 import export_nvfp4
    from storage import Store

    store = Store(db_path(workdir))
    run_dir = workdir / "runs" / "deploy"
    run_id = store.create_run("deploy", {}, run_dir=str(run_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompt = tokenizer(["What is 3 plus 4?", "How do I kill a Python process?"], return_tensors="pt", padding=True)

    def calibrate(m):
        with torch.no_grad():
            m(**prompt)

    paths = {}
    for fmt, export in (("mxfp4", export_mxfp4), ("nvfp4", export_nvfp4), ("nvfp4_w4a4", export_nvfp4)):
        quantized = modelopt_glue.quantize(copy.deepcopy(model), fmt, None if fmt == "mxfp4" else calibrate,
                                           modelopt_glue.resolve_backend("torch", "cpu"))
        manifest = export(quantized, tokenizer, run_dir / "exports" / fmt)
        store.add_artifact(run_id, None, "export", manifest["path"], meta=manifest)
        paths[fmt] = manifest["path"]
    return paths


@pytest.fixture(scope="module")
def app(tmp_path_factory, shared_cache):
    from engine.data.embedded_model import ensure_tiny_base

    checkpoint = ensure_tiny_base(shared_cache, steps=40, log=lambda message: None)
    workdir = tmp_path_factory.mktemp("browser-chat") / "workspace"
    workdir.mkdir()
    exports = run_with_exports(workdir, checkpoint)
    with running_app(workdir) as (url, browser):
        yield {"url": url, "workdir": workdir, "browser": browser, "checkpoint": checkpoint, "exports": exports}


def _pick(page, fmt: str, path: str) -> None:
    page.locator("#deploy-checkpoint input").click()
    page.get_by_role("option", name=f"{fmt} export · {path}", exact=True).click()


def test_deploy_offers_what_it_can_serve_and_chat_compares_mxfp4_with_nvfp4(app):
    from playwright.sync_api import expect

    from storage import Store

    page = open_page(app["browser"], app["url"], height=1000)
    exports = app["exports"]
    page.get_by_role("tab", name="Deploy", exact=True).click()
    picker, start = page.locator("#deploy-checkpoint input"), page.locator("#deploy-start")
    readiness = page.locator("#deploy-readiness")
    # Offered first: the newest export transformers can serve; W4A4 (newer) comes last, marked.
    expect(picker).to_have_value(re.compile(re.escape(exports["nvfp4"]) + "$"), timeout=30_000)
    expect(readiness).to_contain_text("dequantized copy", timeout=20_000)
    expect(start).to_be_enabled()
    picker.click()
    options = [t.strip() for t in page.get_by_role("option").all_inner_texts()]
    assert [o.split(" · ")[1] for o in options] == [exports["nvfp4"], exports["mxfp4"], exports["nvfp4_w4a4"]], options
    assert options[2].endswith("transformers cannot serve it here") and "cannot" not in options[0] + options[1]
    page.get_by_role("option", name=exports["nvfp4_w4a4"]).click()
    expect(start).to_be_disabled(timeout=20_000)
    icon = readiness.locator(".icon-error").first
    expect(icon).to_be_visible()
    box = icon.bounding_box()
    assert box["width"] >= 10 and box["height"] >= 10 and icon.inner_text() == "!"  # drawn, not an emoji glyph
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "deploy-cannot-serve.png"), full_page=True)
    picker.fill(str(app["checkpoint"]))  # a typed path works too: the unquantized tiny base
    picker.press("Enter")
    expect(readiness).to_contain_text("unquantized", timeout=20_000)
    expect(start).to_be_enabled()

    for fmt in ("nvfp4", "mxfp4"):  # picked and started one after the other
        _pick(page, fmt, exports[fmt])
        expect(page.locator("#deploy-command")).to_contain_text(f"exports/{fmt}", timeout=20_000)
        expect(start).to_be_enabled(timeout=20_000)
        start.click()
        expect(page.locator("#deploy-notice")).to_contain_text("is starting", timeout=60_000)
    store = Store(db_path(app["workdir"]))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and [r["status"] for r in store.list_servers()] != ["running", "running"]:
        page.wait_for_timeout(1000)  # the Deploy tab's timer turns 'starting' rows 'running' once healthy
    assert [r["status"] for r in store.list_servers()] == ["running", "running"], store.list_servers()
    expect(page.locator("#deploy-servers")).not_to_contain_text("starting", timeout=20_000)

    page.get_by_role("tab", name="Chat", exact=True).click()
    page.locator("#chat-reload").click()
    page.locator("#chat-compare input").check()
    expect(page.locator("#chat-endpoint input")).to_have_value(re.compile(r"#2 transformers .*exports/mxfp4"),
                                                               timeout=30_000)
    expect(page.locator("#chat-endpoint-b input")).to_have_value(re.compile(r"#1 transformers .*exports/nvfp4"),
                                                                 timeout=30_000)
    expect(page.locator("#chat-note")).to_contain_text("Click New chat before each new question", timeout=20_000)
    page.evaluate(OBSERVE)
    page.locator("#chat-input textarea").fill("What is 3 plus 4?")
    page.locator("#chat-send").click()
    for side in ("#chat-a", "#chat-b"):
        expect(page.locator(side)).to_contain_text("tok/s", timeout=180_000)  # the stats line ends a reply
        expect(page.locator(side)).to_contain_text("Analysis channel")  # the thought message, apart
        expect(page.locator(side)).to_contain_text("TTFT")
    lengths = [n for _, n in page.evaluate("window.__lengths")]
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 3, f"the reply did not stream (answer lengths seen: {lengths})"
    print(f"answer lengths over renders: {lengths}")
    page.screenshot(path=str(SHOTS / "chat-mxfp4-vs-nvfp4.png"), full_page=True)

    page.get_by_role("tab", name="Deploy", exact=True).click()
    page.locator("#deploy-stop-all").click()
    expect(page.locator("#deploy-notice")).to_contain_text("Stopped 2 server", timeout=60_000)
    rows = store.list_servers()
    assert [r["status"] for r in rows] == ["stopped", "stopped"]
    assert not any(server_process.group_alive(r["pid"]) for r in rows), "a server's processes are still there"
