"""Shared by the browser tests: the app started for real (`python launch.py`, its own process session), Debian's
chromium headless through Playwright, and a teardown that leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.serving import server_process
from engine.runtime.workspace import REPO_ROOT, db_path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def playwright():
    """Playwright's sync API, or a skip that says what to install."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium; `make browser`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is not installed (pip install -e '.[test]')")
    return sync_playwright


@contextmanager
def running_app(workdir: Path, log_name: str = "app.log") -> Iterator[tuple[str, object]]:
    """`python launch.py --workdir W --port P` and a headless chromium; yields (url, browser). The app log goes to
    W/log_name. On exit: the app, the servers it started, its engines and any job still running are stopped."""
    sync_playwright = playwright()
    port = server_process.free_port()
    env = dict(os.environ, QAT_STUDIO_HOME=str(workdir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(workdir / log_name, "wb")
    proc = subprocess.Popen([sys.executable, "launch.py", "--workdir", str(workdir), "--port", str(port)],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, timeout=120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield url, browser
            browser.close()
    finally:
        stop_app(proc, workdir)
        log.close()


def open_page(browser, url: str, height: int = 900):
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(url)
    page.wait_for_selector("#tabs", timeout=60_000)
    return page


def stop_app(app: subprocess.Popen, workdir: Path) -> None:
    """The app's process group; the model servers (their own sessions: they outlive the app by design); every engine
    the workspace knows (SIGTERM: it stops its jobs); then any job process group still recorded as running."""
    from storage import Store

    _killpg(app.pid, signal.SIGTERM)
    try:
        app.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _killpg(app.pid, signal.SIGKILL)
        app.wait()
    store = Store(db_path(workdir))
    server_process.stop_all_servers(store)
    engines = [e["pid"] for e in store.live_engines(max_age_s=24 * 3600)]
    for pid in engines:
        _killpg(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in engines):
        time.sleep(0.5)
    for pid in engines:
        _killpg(pid, signal.SIGKILL)
    for job in store.list_jobs(status=["running", "cancelling"]):
        if job["pid"]:
            _killpg(job["pid"], signal.SIGKILL)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
