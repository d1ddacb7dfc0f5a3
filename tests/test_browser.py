"""End to end in a real browser: `python launch.py` (app + engine), headless Debian chromium driven by Playwright.

Picks the smoke recipe, unticks NVFP4 in the QAT tab's form (one format keeps the run short), clicks "Run the whole
recipe", watches the SFT loss plot get points, closes and reopens the page mid-run (the run goes on and is shown
live), measures a page load while training runs, waits for the results table to list original, SFT, PTQ and QAT,
and screenshots every tab at 1280 px
(test-artifacts/screenshots/; with UPDATE_SCREENSHOTS=1 also assets/screenshots/ for the README).

The workspace's model cache is the session's (tests/conftest.py shared_cache: test-artifacts/cache/), so the tiny
base is pre-trained once per session, and not again on re-runs.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from engine.recipe.configs import FORMAT_LABELS
from engine.runtime.workspace import REPO_ROOT, db_path
from tests.browser_app import open_page, running_app

pytestmark = pytest.mark.slow
ARTIFACTS = REPO_ROOT / "test-artifacts"
SHOTS = ARTIFACTS / "screenshots"
README_SHOTS = REPO_ROOT / "assets" / "screenshots"
TABS = ["Recipe", "Dataset", "SFT", "QAT", "Evaluate", "Compare", "Deploy", "Chat", "History"]
RESULT_ROWS = ["original", "SFT", "SFT+PTQ (MXFP4)", "SFT+QAT (MXFP4)"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, shared_cache):
    workdir = tmp_path_factory.mktemp("browser") / "workspace"
    workdir.mkdir()
    (workdir / "cache").symlink_to(shared_cache, target_is_directory=True)
    try:
        with running_app(workdir) as (url, browser):
            yield {"url": url, "workdir": workdir, "browser": browser}
    finally:
        print((workdir / "app.log").read_text()[-3000:])


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _serve_and_ask(page, checkpoint: Path, question: str) -> None:
    """Deploy tab: serve `checkpoint` (transformers); Chat tab: ask `question`, wait for the whole reply."""
    from playwright.sync_api import expect

    _tab(page, "Deploy")
    field = page.locator("#deploy-checkpoint input")
    field.fill(str(checkpoint))
    field.press("Enter")
    expect(page.locator("#deploy-command")).to_contain_text("transformers serve", timeout=20_000)
    page.locator("#deploy-start").click()
    expect(page.locator("#deploy-servers")).to_contain_text("running", timeout=180_000)
    _tab(page, "Chat")
    page.locator("#chat-reload").click()
    expect(page.locator("#chat-endpoint input")).to_have_value(re.compile(r"#\d+ transformers"), timeout=30_000)
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-send").click()
    expect(page.locator("#chat-a")).to_contain_text("tok/s", timeout=120_000)  # the stats line ends a reply


def _screenshots(page) -> list[Path]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    saved = []
    for n, name in enumerate(TABS, start=1):
        _tab(page, name)
        page.wait_for_timeout(2500)  # the tab's timer refreshes within 1.5 s; plots need a moment to draw
        if name == "Dataset":  # show a validation report and the token preview, not an empty form
            page.locator("#validate-data").click()
            page.locator("#token-preview").get_by_text("<|start|>").first.wait_for(timeout=120_000)
            page.wait_for_timeout(1500)
        if name == "Recipe":  # with the run's telemetry chart open
            page.get_by_text("Machine telemetry during this run").click()
            page.wait_for_timeout(1500)
        if name == "Evaluate":  # open one example side by side
            page.locator('#eval-examples [data-testid="cell-0-2"]').click()
            page.locator("#example-detail .answers").wait_for(timeout=20_000)
        path = SHOTS / f"{n:02d}-{name.lower()}.png"
        page.screenshot(path=str(path), full_page=True)
        saved.append(path)
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            README_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, README_SHOTS / path.name)
    return saved


# Words of table headers drawn on more than one line ("langua|ge pass %"): a word's range has one box per line.
BROKEN_HEADER_WORDS = """sel => [...document.querySelectorAll(sel + ' th .header.text')].flatMap(span => {
  const node = [...span.childNodes].find(n => n.nodeType === 3); if (!node) return [];
  return [...node.data.matchAll(/\\S+/g)].filter(m => { const r = document.createRange();
    r.setStart(node, m.index); r.setEnd(node, m.index + m[0].length); return r.getClientRects().length > 1; })
    .map(m => m[0]); })"""
RUN_BOX = """() => { const input = document.querySelector('#run-select input'), s = getComputedStyle(input);
  const arrow = document.querySelector('#run-select .icon-wrap').getBoundingClientRect();
  return {fits: input.scrollWidth <= input.clientWidth,
          clear: arrow.left >= input.getBoundingClientRect().right - parseFloat(s.paddingRight) - 0.5}; }"""
TICKS = "sel => [...document.querySelectorAll(sel + ' .xtick text')].map(t => t.textContent)"


def _layout_checks(page) -> None:
    """What looked broken at 1280 px in headless chromium (issue 17): header words cut in two, the run selector's
    text under its arrow, half-step ticks on the loss charts; the Deploy picker stuck on the SFT model the run had
    when it was selected; and the smoke run's zero table left unexplained."""
    from playwright.sync_api import expect

    _tab(page, "Evaluate")
    expect(page.locator("#eval-results")).to_contain_text("SFT+QAT (MXFP4)", timeout=20_000)
    page.wait_for_timeout(1500)  # Gradio sets the column widths after the rows render
    broken = page.evaluate(BROKEN_HEADER_WORDS, "#eval-results")
    assert broken == [], f"header words cut across lines: {broken}"
    box = page.evaluate(RUN_BOX)
    assert box == {"fits": True, "clear": True}, f"the selected run's text is cut or under the arrow: {box}"
    expect(page.locator("#eval-results-note")).to_contain_text("trained only 8 SFT steps")
    for tab, charts in (("SFT", "#sft-charts"), ("QAT", "#qat-charts")):
        _tab(page, tab)
        page.locator(f"{charts} .xtick text").first.wait_for(timeout=20_000)
        ticks = page.evaluate(TICKS, charts)
        assert ticks and all(t.isdigit() for t in ticks), ticks
    _tab(page, "Deploy")  # the export written after the run was selected is what the picker offers now
    expect(page.locator("#deploy-checkpoint input")).to_have_value(re.compile(r"^mxfp4 export · .*exports/mxfp4$"),
                                                                   timeout=20_000)
    _tab(page, "Recipe")
    page.wait_for_timeout(1500)
    broken = page.evaluate(BROKEN_HEADER_WORDS, "#results-table")
    assert broken == [], f"header words cut across lines: {broken}"
    expect(page.locator("#results-note")).to_contain_text("pass rates near 0% are expected")


def _page_load_seconds(browser, url: str) -> tuple[float, float, float]:
    """(HTML received, first API response's own latency, total) from the browser's Performance API. The time
    chromium spends parsing the JS bundle in between is the browser's, not the server's, and is not counted."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_function("performance.getEntriesByType('resource').some(e => e.name.includes('/gradio_api/') "
                           "&& !e.name.includes('heartbeat') && e.responseEnd > 0)", timeout=60_000)
    html, api = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const first = performance.getEntriesByType('resource').filter(
            e => e.name.includes('/gradio_api/') && !e.name.includes('heartbeat') && e.responseEnd > 0)
            .sort((a, b) => a.responseEnd - b.responseEnd)[0];
        return [nav.responseEnd / 1000, (first.responseEnd - first.startTime) / 1000];
    }""")
    page.close()
    return html, api, html + api


def test_whole_recipe_in_the_browser(app):
    started = time.time()
    browser, url, workdir = app["browser"], app["url"], app["workdir"]
    page = open_page(browser, url)
    from playwright.sync_api import expect

    page.locator("#recipe-picker input").click()
    page.get_by_role("option", name="smoke", exact=True).click()
    expect(page.get_by_text("Loaded smoke.yaml into the forms.")).to_be_visible(timeout=20_000)
    _tab(page, "QAT")  # one format keeps the run short: untick NVFP4 in the form the QAT tab generates
    page.get_by_label(FORMAT_LABELS["nvfp4"]).uncheck()
    _tab(page, "Recipe")
    clicked = time.time()
    page.locator("#run-recipe").click()
    expect(page.get_by_text("queued (10 jobs)")).to_be_visible(timeout=30_000)
    print(f"Run click to 'queued': {time.time() - clicked:.1f} s")  # validation + queueing, on a warm app
    run_id = page.locator("#run-select input").input_value().split(" · ")[0]
    assert run_id, "the new run is selected"
    expect(page).to_have_url(re.compile(f"run={run_id}"), timeout=20_000)  # a reload keeps the selection

    _tab(page, "SFT")
    page.wait_for_function("document.querySelectorAll('#sft-charts .scatterlayer .trace .points path').length > 0",
                           timeout=300_000, polling=1000)

    html_s, api_s, total_s = _page_load_seconds(browser, url)  # while SFT trains on both CPU cores
    print(f"page load during training: HTML {html_s:.3f} s + first API response {api_s:.3f} s = {total_s:.3f} s")
    # What this guards: the page is served while the engine trains (the app does no training work and no blocking
    # call while loading). Not a speed test: the 1 s bound once here failed at 1.08 s on cores shared with other
    # work; a page held up by the training (a step, a checkpoint save) would take far longer than this bound.
    assert total_s < 5.0

    page.close()  # closing the browser must not stop the run
    time.sleep(3)
    from storage import Store

    assert Store(db_path(workdir)).get_run(run_id)["status"] == "running"  # the engine kept going without a page
    page = open_page(browser, url)  # no ?run=: the newest run is selected
    expect(page.locator("#run-select input")).to_have_value(re.compile(f"^{run_id} · smoke · running"),
                                                            timeout=20_000)
    status = page.locator("#run-status")
    expect(status).to_contain_text("running", timeout=20_000)
    before = status.inner_text()
    page.wait_for_function("t => document.querySelector('#run-status').innerText.split('·')[1] !== t.split('·')[1]",
                           arg=before, timeout=300_000, polling=1000)  # the jobs-done count moves: shown live

    _tab(page, "Recipe")
    table = page.locator("#results-table")
    for row in RESULT_ROWS:
        expect(table).to_contain_text(row, timeout=900_000)
    expect(page.locator("#run-status")).to_contain_text("succeeded", timeout=300_000)
    shots = _screenshots(page)
    assert all(p.stat().st_size > 10_000 for p in shots)
    _layout_checks(page)
    print(f"browser test: {time.time() - started:.0f} s")


@pytest.mark.skipif(not os.environ.get("SCREENSHOT_WORKDIR"), reason="set SCREENSHOT_WORKDIR=<a workspace with a "
                    "finished demo run> to refresh the README's screenshots from it")
def test_readme_screenshots_from_a_finished_run():
    """Not a check: renders every tab of an existing workspace (e.g. after `launch.py run demo.yaml`) for the README."""
    workdir = Path(os.environ["SCREENSHOT_WORKDIR"]).resolve()
    with running_app(workdir, log_name="app-screenshots.log") as (url, browser):
        page = open_page(browser, url)
        exports = sorted(workdir.glob("runs/*/exports/mxfp4"))
        if exports:  # the Deploy and Chat shots with the run's export served and one question answered
            _serve_and_ask(page, exports[-1], "What is 8 plus 6?")
        os.environ["UPDATE_SCREENSHOTS"] = "1"
        assert all(path.stat().st_size > 10_000 for path in _screenshots(page))
