"""Deploy tab: serve a run's exported checkpoint (MXFP4 / NVFP4) or its BF16 SFT model, watch the server, stop it.

The command is always shown (copyable), also when the backend is not installed here or the format needs another
GPU: that is the command to run elsewhere. Servers are separate processes: they keep running when the app stops,
and a restarted app finds them again (engine.serving.server_process.reconcile_servers). An external endpoint (any OpenAI-compatible
URL + key) is kept in this browser session's gr.State only: never in the database, logs or recipes.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from engine.serving import server_process
from engine.serving.backends import BACKENDS, ExternalEndpoint, TrtllmOptions
from engine.serving.formats import gpu_summary
from ui import views
from ui.state import AppState

SERVER_COLUMNS = ["id", "status", "backend", "url", "model", "pid", "started"]
TRT_FIELDS = ["backend", "tp_size", "pp_size", "max_batch_size", "max_num_tokens", "kv_cache_free_gpu_memory_fraction"]
_external_states: dict[int, gr.State] = {}


def external_endpoints(state: AppState) -> gr.State:
    """The session's external endpoints ([ExternalEndpoint]), shared with the Chat tab."""
    if id(state) not in _external_states:
        _external_states[id(state)] = gr.State([])
    return _external_states[id(state)]


def build(state: AppState) -> None:
    server_process.reconcile_servers(state.store())  # a restarted app finds its servers again; dead ones become 'gone'
    gr.Markdown("Serve a checkpoint with an OpenAI-compatible API, then talk to it on the **Chat** tab.")
    with gr.Row():
        checkpoint = gr.Dropdown(label="Checkpoint (the selected run's exports and SFT model, or type a path)",
                                 choices=[], allow_custom_value=True, scale=3, elem_id="deploy-checkpoint")
        backend = gr.Radio([(b.label, b.name) for b in BACKENDS.values()], value="transformers", label="Backend",
                           scale=2, elem_id="deploy-backend")
    with gr.Row():
        host = gr.Textbox("127.0.0.1", label="Host", scale=1)
        port = gr.Number(0, precision=0, label="Port (0 = any free port)", scale=1, minimum=0, maximum=65535)
        allow_network = gr.Checkbox(False, label="Allow a non-loopback host (no authentication!)", scale=2)
    trt = _trtllm_form()
    readiness = gr.HTML(elem_id="deploy-readiness")
    command = gr.Code(language="shell", label="Command (copy it to run elsewhere; port 0 shows 8000)", lines=2,
                      interactive=False, elem_id="deploy-command")
    with gr.Row():
        start = gr.Button("▶ Start server", variant="primary", elem_id="deploy-start", interactive=False)
        stop = gr.Button("■ Stop selected", variant="stop", elem_id="deploy-stop")
        check = gr.Button("Check health")
        stop_all = gr.Button("Stop all servers", elem_id="deploy-stop-all")
    notice = gr.HTML(elem_id="deploy-notice")
    servers = gr.Dataframe(pd.DataFrame(columns=SERVER_COLUMNS), label="Servers", interactive=False,
                           elem_id="deploy-servers")
    selected = gr.Dropdown(label="Server (log below)", choices=[], value=None, elem_id="deploy-selected")
    log = gr.Textbox(label="Server log (last lines)", lines=12, max_lines=12, interactive=False, elem_classes=["log"])
    gr.Markdown("<span class='note'>Servers are separate processes: they keep running when you stop the app (stop "
                "them here first, or with <b>Stop all servers</b>); a restarted app finds running ones again.</span>")
    _external_section(state)

    plan_inputs = [checkpoint, backend, host, port, *(trt[name] for name in TRT_FIELDS)]
    for component in plan_inputs:
        component.change(preview, plan_inputs, [readiness, command, start], show_progress="hidden")
    backend.change(lambda b: gr.Accordion(visible=b == "trtllm"), backend, trt["_box"])
    auto_pick = gr.State(None)  # the checkpoint picked for the user (not by them): re-picked when exports arrive
    state.run.change(lambda run_id, b: _picked(state, run_id, b), [state.run, backend], [checkpoint, auto_pick])
    state.tabs["deploy"].select(lambda run_id, b, current, auto: reopened(state, run_id, b, current, auto),
                                [state.run, backend, checkpoint, auto_pick], [checkpoint, auto_pick])
    backend.change(lambda run_id, b, current: checkpoint_update(state, run_id, b, keep=current),
                   [state.run, backend, checkpoint], checkpoint)
    start.click(lambda *a: start_clicked(state, *a), [state.run, allow_network, *plan_inputs],
                [notice, servers, selected, log])
    stop.click(lambda sid: stop_clicked(state, sid), selected, [notice, servers, selected, log])
    stop_all.click(lambda sid: stop_all_clicked(state, sid), selected, [notice, servers, selected, log])
    check.click(lambda sid: check_clicked(state, sid), selected, [notice, servers, selected, log])
    selected.change(lambda sid: server_log(state, sid), selected, log, show_progress="hidden")
    state.tab_timer("deploy", every=2.0).tick(lambda sid: refresh(state, sid), selected, [servers, selected, log],
                                               show_progress="hidden")


def _trtllm_form() -> dict:
    """TRT-LLM's serve options, from TrtllmOptions (bounds and defaults included)."""
    fields = TrtllmOptions.model_fields
    with gr.Accordion("TensorRT-LLM options", open=True, visible=False) as box:
        with gr.Row():
            form = {"backend": gr.Dropdown(["pytorch", "tensorrt", "_autodeploy"], value=fields["backend"].default,
                                           label="--backend")}
            for name in ("tp_size", "pp_size", "max_batch_size", "max_num_tokens"):
                form[name] = gr.Number(fields[name].default, precision=0, label=f"--{name}")
            fraction = "kv_cache_free_gpu_memory_fraction"
            form[fraction] = gr.Slider(0.05, 1.0, step=0.05, value=fields[fraction].default, label=f"--{fraction}")
    return {**form, "_box": box}


def _external_section(state: AppState) -> None:
    endpoints = external_endpoints(state)
    with gr.Accordion("External endpoint (any OpenAI-compatible server)", open=False):
        gr.Markdown("<span class='note'>The key stays in this browser session's memory: it is never written to the "
                    "database, a log or a recipe, and is gone when you reload the page.</span>")
        with gr.Row():
            url = gr.Textbox(label="Base URL", placeholder="https://host:8000/v1", scale=3)
            key = gr.Textbox(label="API key", type="password", scale=2)
            model = gr.Textbox(label="Model (empty = the first one it lists)", scale=2)
        with gr.Row():
            add = gr.Button("Add endpoint")
            test = gr.Button("Test (list models)")
        listing = gr.HTML()
    add.click(add_external, [endpoints, url, key, model], [endpoints, listing, key])
    test.click(test_external, [url, key], listing)


# ------------------------------------------------------------------------------------------------ handlers


def checkpoint_choices(state: AppState, run_id: str | None, backend: str = "transformers") -> list[tuple[str, str]]:
    """The run's exports (newest first) and its BF16 SFT model; those `backend` cannot serve here come last, their
    label saying so (the reason is in the readiness box when picked)."""
    if not run_id:
        return []
    store = state.store()
    paths = []
    for artifact in reversed(store.artifacts(run_id, kind="export")):
        fmt = (artifact.get("meta") or {}).get("format", "export")
        if Path(artifact["path"]).is_dir():
            paths.append((f"{fmt} export · {artifact['path']}", artifact["path"]))
    run = store.get_run(run_id) or {}
    sft = Path(run.get("run_dir") or "") / "models" / "sft"
    if run.get("run_dir") and (sft / "config.json").is_file():
        paths.append((f"BF16 SFT model · {sft}", str(sft)))
    servable, not_servable = [], []
    for label, path in paths:
        if server_process.plan_server(path, backend).errors:
            not_servable.append((f"{label} · {BACKENDS[backend].name} cannot serve it here", path))
        else:
            servable.append((label, path))
    return servable + not_servable


def checkpoint_update(state: AppState, run_id: str | None, backend: str = "transformers", keep: str | None = None):
    """The run's checkpoints, the first one `backend` can serve picked; `keep` (the user's pick, when the backend
    changed) stays picked, relabelled. A run without any keeps what was typed."""
    return _picked(state, run_id, backend, keep)[0]


def _picked(state: AppState, run_id: str | None, backend: str, keep: str | None = None) -> tuple:
    """(dropdown update, the value it picked for the user or None)."""
    choices = checkpoint_choices(state, run_id, backend or "transformers")
    if keep:
        return gr.Dropdown(choices=choices, value=keep), None
    if not choices:
        return gr.Dropdown(choices=[]), None
    return gr.Dropdown(choices=choices, value=choices[0][1]), choices[0][1]


def reopened(state: AppState, run_id: str | None, backend: str, current: str | None, auto: str | None):
    """The tab opened again: the run may have exported since it was selected (a run finishing while you watch).
    A checkpoint the user picked or typed stays; one picked for them is replaced by the best one now."""
    if current and current != auto:
        return _picked(state, run_id, backend, keep=current)[0], auto
    return _picked(state, run_id, backend)


def _options(backend: str, trt_values: tuple) -> dict | None:
    """The TRT-LLM form's values (validated by TrtllmOptions when planning); other backends use their defaults."""
    return dict(zip(TRT_FIELDS, trt_values)) if backend == "trtllm" else None


def preview(checkpoint, backend, host, port, *trt_values):
    """What the format needs, what this machine has, the exact command, and Start enabled only if it can start."""
    if not checkpoint:
        return views.message("Pick a checkpoint (or type a path).", "info"), "", gr.Button(interactive=False)
    try:
        plan = server_process.plan_server(checkpoint, backend, host or "127.0.0.1", int(port or 0) or None,
                                          _options(backend, trt_values))
    except (ValueError, TypeError) as exc:
        return views.message(f"Invalid options: {exc}", "error"), "", gr.Button(interactive=False)
    rows = [f"<b>Format:</b> {views.esc(plan.info.label)} · <b>GPU:</b> {views.esc(gpu_summary())} · "
            f"<b>{views.esc(plan.backend.name)}:</b> {'installed' if plan.installed else 'not installed here'}"]
    rows += [f"{views.icon(f.level)}{views.esc(f.text)}" for f in plan.findings]
    rows.append(f"<span class='note'>{views.esc(plan.backend.notes)}</span>")
    kind = "error" if plan.errors else "info"
    return (f"<div class='msg msg-{kind}'>" + "<br>".join(rows) + "</div>", plan.command,
            gr.Button(interactive=not plan.errors))


def start_clicked(state: AppState, run_id, allow_network, checkpoint, backend, host, port, *trt_values):
    if not checkpoint:
        return (views.message("Pick a checkpoint first.", "error"), *_table_and_log(state, None))
    store = state.store()
    known_run = run_id if run_id and store.get_run(run_id) else None
    try:
        row = server_process.start_server(store, checkpoint, backend, host=(host or "127.0.0.1").strip(),
                                   port=int(port or 0) or None, run_id=known_run,
                                   options=_options(backend, trt_values), allow_network=bool(allow_network),
                                   wait=False)
    except (server_process.ServingError, ValueError) as exc:
        return (views.message(f"Not started:\n{exc}", "error"), *_table_and_log(state, None))
    text = (f"Server #{row['id']} is starting at {row['base_url']} (loading the model; it turns 'running' when "
            "its health check answers). Chat with it on the Chat tab.")
    return (views.message(text, "ok"), *_table_and_log(state, row["id"]))


def stop_clicked(state: AppState, server_id):
    if not server_id:
        return (views.message("Select a server first.", "error"), *_table_and_log(state, None))
    row = server_process.stop_server(state.store(), int(server_id))
    return (views.message(f"Server #{row['id']}: {row['status']}.", "ok"), *_table_and_log(state, row["id"]))


def stop_all_clicked(state: AppState, server_id):
    stopped = server_process.stop_all_servers(state.store())
    text = f"Stopped {len(stopped)} server(s)." if stopped else "No server was running."
    return (views.message(text, "ok"), *_table_and_log(state, server_id))


def check_clicked(state: AppState, server_id):
    if not server_id:
        return (views.message("Select a server first.", "error"), *_table_and_log(state, None))
    row = server_process.refresh_server(state.store(), int(server_id))
    healthy = row["status"] in server_process.LIVE and server_process.is_healthy(row)
    text = f"Server #{row['id']} is {row['status']}; {row.get('health_url', '')} " + \
        ("answers." if healthy else "does not answer.")
    return (views.message(text, "ok" if healthy else "error"), *_table_and_log(state, row["id"]))


def refresh(state: AppState, server_id):
    store = state.store()
    for row in store.list_servers():
        if row["status"] in server_process.LIVE:
            server_process.refresh_server(store, row["id"])
    return _table_and_log(state, server_id)


def _table_and_log(state: AppState, server_id) -> tuple:
    rows = [server_process.with_urls(r) for r in reversed(state.store().list_servers())]
    frame = pd.DataFrame([{
        "id": r["id"], "status": r["status"], "backend": r["backend"], "url": r.get("base_url", ""),
        "model": r["model_path"], "pid": r["pid"],
        "started": time.strftime("%m-%d %H:%M:%S", time.localtime(r["started_at"])) if r["started_at"] else "",
    } for r in rows], columns=SERVER_COLUMNS)
    choices = [(f"#{r['id']} · {r['status']} · {r['backend']} · {r.get('base_url', '')}", r["id"]) for r in rows]
    known = {r["id"] for r in rows}
    value = int(server_id) if server_id and int(server_id) in known else (rows[0]["id"] if rows else None)
    return frame, gr.Dropdown(choices=choices, value=value), server_log(state, value)


def server_log(state: AppState, server_id) -> str:
    if not server_id:
        return ""
    try:
        return server_process.log_tail(server_process.get_server(state.store(), int(server_id)), lines=60)
    except server_process.ServingError:
        return ""


def add_external(endpoints: list, url: str, key: str, model: str):
    try:
        endpoint = ExternalEndpoint(url, api_key=key or None, model=(model or "").strip() or None,
                                    name=f"external {len(endpoints) + 1}")
    except ValueError as exc:
        return endpoints, views.message(str(exc), "error"), gr.skip()
    endpoints = [*endpoints, endpoint]
    listed = "<br>".join(views.esc(e.describe()) for e in endpoints)
    return endpoints, views.message("Added; pick it on the Chat tab.", "ok") + f"<div class='note'>{listed}</div>", ""


def test_external(url: str, key: str):
    from engine.serving.chat import ChatClient

    try:
        ExternalEndpoint(url)
        models = ChatClient(url.strip().rstrip("/"), api_key=key or None, timeout=15).models()
    except Exception as exc:  # any failure is the answer to "does it work"
        return views.message(f"{url} did not answer: {type(exc).__name__}: {exc}", "error")
    return views.message(f"{url} answers; models: {', '.join(models) or '(none)'}", "ok")
