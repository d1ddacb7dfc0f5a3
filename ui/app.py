"""The web app: `python launch.py` serves it on http://127.0.0.1:7860 and starts the engine if none runs.

    build_app(workdir) -> gr.Blocks       the UI (tests use it)
    launch_app(workdir, host, port, auth)  start the engine (it records the telemetry history), then serve (blocks)

Tabs: Recipe, Dataset, SFT, QAT, Evaluate, Compare, Deploy, Chat, History; one module each (ui/tab_*.py with a
`build(state)` function; ui/state.py documents the state they share). Everything under ui/ only draws and calls
engine/storage: training runs in the engine's processes, so this process stays responsive.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import gradio as gr

from engine.serving.server_process import is_loopback  # the one loopback rule for the app and the servers it starts
from ui import header
from ui.state import AppState, warm_up_in_background

TABS = [("recipe", "Recipe"), ("dataset", "Dataset"), ("sft", "SFT"), ("qat", "QAT"), ("evaluate", "Evaluate"),
        ("compare", "Compare"), ("deploy", "Deploy"), ("chat", "Chat"), ("history", "History")]
OPTIONAL_TABS = {"deploy", "chat"}  # built by another module owner; the app works without them
CSS_FILE = Path(__file__).with_name("style.css")
# Mirror the selected run into the address bar (?run=ID) so a reload, a bookmark or a shared link shows it again.
URL_JS = """(run) => { const u = new URL(window.location.href);
  if (run) { u.searchParams.set('run', run); } else { u.searchParams.delete('run'); }
  window.history.replaceState(null, '', u); return run; }"""
NETWORK_REFUSAL = ("binding {host} exposes the app to the network; pass --auth user:pass or --auth FILE "
                   "(a file of user:pass lines)")


APP_TITLE = "gpt-oss QAT Studio"  # also how a second launch recognises a running app on its port


def build_app(workdir: Path) -> gr.Blocks:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state = AppState(workdir)
    with gr.Blocks(title=APP_TITLE) as app:
        header.build(state)
        with gr.Tabs(selected="recipe", elem_id="tabs") as tabs:
            state.goto_tab = tabs
            tab_blocks = {}
            for tab_id, title in TABS:
                with gr.Tab(title, id=tab_id, elem_id=f"tab-{tab_id}") as tab_blocks[tab_id]:
                    state.tabs[tab_id] = tab_blocks[tab_id]
                    _build_tab(tab_id, state)
        state.finish()
        _wire_tab_timers(state, tab_blocks)
        _wire_run_selection(state, app)
    _undocument_handlers(app)
    return app


def _undocument_handlers(app: gr.Blocks) -> None:
    """The event handlers are the page's internals, not an API. Documented, each page load builds API docs with
    code snippets for every one of them (465 KB of the 784 KB page, rebuilt per request); undocumented, the page
    still calls them, nothing else changes."""
    for fn in app.fns.values():
        if fn.api_visibility == "public":
            fn.api_visibility = "undocumented"


def _build_tab(tab_id: str, state: AppState) -> None:
    try:
        module = importlib.import_module(f"ui.tab_{tab_id}")
    except ModuleNotFoundError as exc:
        if tab_id not in OPTIONAL_TABS or exc.name != f"ui.tab_{tab_id}":
            raise  # a missing dependency inside a tab module is a bug, not an optional tab
        gr.Markdown(f"**Not installed:** `ui/tab_{tab_id}.py` is not part of this installation yet.")
        return
    module.build(state)


def _wire_tab_timers(state: AppState, tabs: dict) -> None:
    """Each tab's live-refresh timer ticks only while the tab is shown."""
    names = list(state.timers)
    timers = [state.timers[n] for n in names]
    for tab_id, tab in tabs.items():
        tab.select(_activate(tab_id, names), None, timers, show_progress="hidden", queue=False)


def _activate(tab_id: str, names: list[str]):
    return lambda: [gr.Timer(active=(name == tab_id)) for name in names]


def _wire_run_selection(state: AppState, app: gr.Blocks) -> None:
    signature = gr.State(None)

    def initial(request: gr.Request):
        """?run=ID from the URL if it exists, else the newest run."""
        wanted = request.query_params.get("run") if request else None
        runs = state.store().list_runs()
        known = {r["id"] for r in runs}
        chosen = wanted if wanted in known else (runs[0]["id"] if runs else None)
        return gr.Dropdown(choices=state.run_choices(), value=chosen), _runs_signature(state)

    def poll(current: str | None, seen):
        """New runs (also from the CLI) and status changes reach the selector; an empty selector takes the newest."""
        now = _runs_signature(state)
        if now == seen:
            return gr.skip(), seen
        if not current and now:
            return state.select_run(now[0][0]), now
        return gr.Dropdown(choices=state.run_choices()), now

    app.load(initial, None, [state.run, signature], show_progress="hidden")
    gr.Timer(3.0).tick(poll, [state.run, signature], [state.run, signature], show_progress="hidden")
    state.run.change(None, state.run, None, js=URL_JS)


def _runs_signature(state: AppState) -> list:
    return [[r["id"], r["status"]] for r in state.store().list_runs()]


def parse_auth(auth: str | None) -> list[tuple[str, str]] | None:
    """'user:pass', or a file with one user:pass per line (blank lines and # comments ignored)."""
    if not auth:
        return None
    path = Path(auth).expanduser()
    lines = path.read_text().splitlines() if path.is_file() else [auth]
    pairs = []
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth: expected user:password{' lines in ' + str(path) if path.is_file() else ''}, "
                             f"got {line[:20]!r}")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"--auth: {path} holds no user:password lines")
    return pairs


def launch_app(workdir: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> int:
    """Serve until interrupted; non-zero with an explanation when the settings are unsafe or wrong."""
    try:
        credentials = parse_auth(auth)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not credentials:
        print(f"error: {NETWORK_REFUSAL.format(host=host)}", file=sys.stderr)
        return 2
    exit_status = port_taken(host, port)
    if exit_status is not None:
        return exit_status
    from engine.runtime.worker import ensure_engine

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        engine_pid = ensure_engine(workdir)  # exits once idle with no app beating for APP_GONE_EXIT_S
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"engine: {'started, pid ' + str(engine_pid) if engine_pid else 'already running'} ({workdir})", flush=True)
    beat_in_background(workdir)
    warm_up_in_background()
    app = build_app(workdir)
    _warm_up()
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, auth=credentials, share=False, ssr_mode=False,
               footer_links=[], css_paths=[CSS_FILE], theme=theme(), show_error=True, quiet=False)
    return 0


def beat_in_background(workdir: Path) -> None:
    """The app's heartbeat in storage, every APP_HEARTBEAT_S: the engine it started exits once idle and no app has
    beaten for APP_GONE_EXIT_S (engine/runtime/worker.py), so it never outlives the app for long."""
    import os
    import socket
    import threading
    import time

    from engine.runtime import workspace
    from engine.runtime.worker import APP_HEARTBEAT_S
    from storage import Store

    def beat() -> None:
        store, app_id = Store(workspace.db_path(workdir)), None
        while True:
            try:
                app_id = store.app_heartbeat(app_id, os.getpid(), socket.gethostname())
            except Exception as exc:  # noqa: BLE001 - a busy database must not stop the beat for good
                print(f"app heartbeat not written: {exc}", file=sys.stderr, flush=True)
            time.sleep(APP_HEARTBEAT_S)

    threading.Thread(target=beat, name="app-heartbeat", daemon=True).start()


def port_taken(host: str, port: int) -> int | None:
    """None when the port is free. Else say who holds it: this app (a second `make demo`: print its address, exit 0)
    or another program (exit 1 with what to do), instead of Gradio's 'Cannot find empty port' traceback."""
    import json
    import socket
    import urllib.request

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT socket is free
        try:
            sock.bind((host, port))
            return None
        except OSError:
            pass
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}"
    try:
        with urllib.request.urlopen(f"{url}/config", timeout=5) as reply:
            ours = json.load(reply).get("title") == APP_TITLE
    except Exception:  # not HTTP, not Gradio, behind auth...: not recognisably this app
        ours = False
    if ours:
        print(f"already running at {url}")
        return 0
    print(f"error: port {port} on {host} is in use by another program; stop it or pick another port with --port N",
          file=sys.stderr)
    return 1


def _warm_up() -> None:
    """Build each kind of chart once before serving: plotly imports its validators lazily (seconds on a busy CPU),
    which would otherwise land on the first page load."""
    from ui import charts

    charts.training_figure({"sft": {"loss": [[1, 2], [2.0, 1.0]]}}, {"SFT level": 1.0}).to_json()
    charts.pass_rate_bars([{"stage": "sft", "format": "bf16", "metrics": {"pass_rate": 0.5}}], []).to_json()
    charts.telemetry_figure([{"time": 0.0, "sample": {"cpu_percent": 1.0, "ram_used_gb": 1.0}}]).to_json()


def theme() -> gr.themes.Base:
    # System fonts only: the default theme fetches Google Fonts, which an offline or firewalled machine cannot reach.
    return gr.themes.Soft(primary_hue="green", secondary_hue="blue", neutral_hue="slate",
                          font=[gr.themes.Font(f) for f in ("Inter", "ui-sans-serif", "system-ui", "sans-serif")],
                          font_mono=[gr.themes.Font(f) for f in ("ui-monospace", "SFMono-Regular", "monospace")])
