"""Deploy + Chat in a real browser: the app (`python launch.py`) in a subprocess, headless Debian chromium via
Playwright. Starts a `transformers serve` server from the Deploy tab (typing a checkpoint path: the tiny base model,
as a fresh workspace has no runs), chats with it on the Chat tab and checks the reply streamed (its text grew over
several renders) with its analysis apart and TTFT / tokens/s under it, then stops every server from the Deploy tab
and checks no server process is left.
"""

from __future__ import annotations

import pytest

from engine.serving import server_process
from engine.runtime.workspace import REPO_ROOT, db_path
from tests.browser_app import open_page, running_app

pytestmark = pytest.mark.slow
CACHE = REPO_ROOT / "test-artifacts" / "browser-cache"
SHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
# Every render of the chatbot: (ms since the observer started, text length of its last answer).
OBSERVE = """() => { window.__lengths = []; const t0 = performance.now();
  const root = document.querySelector('#chat-a');
  const note = () => { const bots = root.querySelectorAll('.bot, [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    window.__lengths.push([performance.now() - t0, text.length]); };
  new MutationObserver(note).observe(root, {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from engine.data.embedded_model import ensure_tiny_base

    checkpoint = ensure_tiny_base(CACHE, steps=40, log=lambda message: None)
    workdir = tmp_path_factory.mktemp("browser-chat") / "workspace"
    workdir.mkdir()
    with running_app(workdir) as (url, browser):
        yield {"url": url, "workdir": workdir, "browser": browser, "checkpoint": checkpoint}


def test_deploy_then_chat_streams_a_reply(app):
    from playwright.sync_api import expect

    from storage import Store

    page = open_page(app["browser"], app["url"], height=1000)

    page.get_by_role("tab", name="Deploy", exact=True).click()
    field = page.locator("#deploy-checkpoint input")
    field.fill(str(app["checkpoint"]))
    field.press("Enter")
    expect(page.locator("#deploy-command")).to_contain_text("transformers serve", timeout=20_000)
    expect(page.locator("#deploy-readiness")).to_contain_text("unquantized", timeout=20_000)
    page.locator("#deploy-start").click()
    expect(page.locator("#deploy-notice")).to_contain_text("is starting", timeout=30_000)
    expect(page.locator("#deploy-servers")).to_contain_text("running", timeout=180_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "deploy-running-server.png"), full_page=True)

    page.get_by_role("tab", name="Chat", exact=True).click()
    page.locator("#chat-reload").click()
    expect(page.locator("#chat-endpoint input")).to_have_value(__import__("re").compile(r"#1 transformers"),
                                                               timeout=30_000)
    page.evaluate(OBSERVE)
    page.locator("#chat-input textarea").fill("What is 3 plus 4?")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-a")).to_contain_text("tok/s", timeout=120_000)  # the stats line ends a reply
    lengths = [n for _, n in page.evaluate("window.__lengths")]
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 3, f"the reply did not stream (answer lengths seen: {lengths})"
    print(f"answer lengths over renders: {lengths}")
    expect(page.locator("#chat-a")).to_contain_text("Analysis channel")  # the thought message, apart
    expect(page.locator("#chat-a")).to_contain_text("TTFT")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-streamed-reply.png"), full_page=True)

    page.get_by_role("tab", name="Deploy", exact=True).click()
    page.locator("#deploy-stop-all").click()
    expect(page.locator("#deploy-notice")).to_contain_text("Stopped 1 server", timeout=60_000)
    rows = Store(db_path(app["workdir"])).list_servers()
    assert [r["status"] for r in rows] == ["stopped"]
    assert not server_process.group_alive(rows[0]["pid"]), "the server's processes are still there"
