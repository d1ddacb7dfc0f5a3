"""History tab: every run with status, recipe, duration and best pass rate; open one (selects it in every tab) or
delete it (after a confirmation; removes its run directory too)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ui import run_data, views
from ui.state import AppState

ACTIVE = ("queued", "running")


def build(state: AppState) -> None:
    runs = gr.Dataframe(label="Runs (click one to select it)", interactive=False, wrap=True, elem_id="history-table")
    picked = gr.State(None)
    with gr.Row(equal_height=True):
        chosen = gr.HTML("<div class='note'>No run picked.</div>", scale=3)
        open_button = gr.Button("Open in every tab", variant="primary", scale=1, interactive=False)
        delete_button = gr.Button("Delete…", variant="stop", scale=1, interactive=False)
    with gr.Row(visible=False, equal_height=True) as confirm_row:
        confirm_text = gr.HTML(scale=3)
        confirm = gr.Button("Yes, delete it", variant="stop", scale=1)
        keep = gr.Button("Keep it", scale=1)
    notice = gr.HTML()

    gr.on(state.shown("history", every=5.0), lambda: table(state), None, runs, show_progress="hidden")
    def on_select(frame: pd.DataFrame, evt: gr.SelectData):  # gradio passes SelectData by this annotation
        return pick(state, frame, evt)

    runs.select(on_select, runs, [picked, chosen, open_button, delete_button])
    open_button.click(lambda run_id: (state.select_run(run_id), gr.Tabs(selected="recipe")), picked,
                      [state.run, state.goto_tab])
    delete_button.click(lambda run_id: ask(state, run_id), picked, [confirm_row, confirm_text])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)
    confirm.click(lambda run_id, current: delete(state, run_id, current), [picked, state.run],
                  [notice, confirm_row, runs, state.run, picked, open_button, delete_button])


def table(state: AppState) -> pd.DataFrame:
    store = state.store()
    rows = []
    for run in store.list_runs():
        jobs = store.list_jobs(run["id"])
        best = run_data.best_pass_rate(store, run["id"])
        rows.append({
            "run": run["id"], "recipe": run["name"], "status": run["status"],
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"])),
            "duration": run_data.fmt_duration(run_data.run_seconds(run)),
            "jobs done": f"{sum(j['status'] == 'succeeded' for j in jobs)}/{len(jobs)}",
            "best pass %": "-" if best is None else f"{100 * best:.1f}",
        })
    return pd.DataFrame(rows, columns=["run", "recipe", "status", "created", "duration", "jobs done", "best pass %"])


def pick(state: AppState, frame: pd.DataFrame, evt: gr.SelectData):
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if row is None or frame is None or row >= len(frame):
        off = gr.Button(interactive=False)
        return None, "<div class='note'>No run picked.</div>", off, off
    picked = frame.iloc[row]
    run_id = str(picked["run"])
    note = (f"<div class='note'>Picked <code>{views.esc(run_id)}</code> ({views.esc(picked['recipe'])}, "
            f"{views.esc(picked['status'])}).</div>") + timing_html(state.store(), run_id)
    return run_id, note, gr.Button(interactive=True), gr.Button(interactive=True)


TIMING_COLUMNS = (("start_imports_s", "start + imports s"), ("load_s", "load s"), ("compute_s", "compute s"),
                  ("save_s", "save s"), ("peak_gpu_gib", "peak GPU GiB"), ("peak_gpu_reserved_gib", "reserved GiB"),
                  ("disk_written_gib", "disk written GiB"))


def timing_html(store, run_id: str) -> str:
    """Where each job's time went (engine/runtime/job_timing.py), as a table; empty when no job recorded any."""
    jobs = [j for j in store.list_jobs(run_id) if j.get("timing")]
    if not jobs:
        return ""
    head = "".join(f"<th>{views.esc(label)}</th>" for _, label in TIMING_COLUMNS)
    rows = []
    for job in jobs:
        cells = "".join(f"<td>{'-' if job['timing'].get(key) is None else views.esc(job['timing'][key])}</td>"
                        for key, _ in TIMING_COLUMNS)
        rows.append(f"<tr><td>{views.esc(job['config'].get('key', job['stage']))}</td>"
                    f"<td>{views.esc(job['status'])}</td>{cells}</tr>")
    return (f"<table class='compare' id='history-timing'><tr><th>job</th><th>status</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def ask(state: AppState, run_id: str | None):
    run = state.store().get_run(run_id) if run_id else None
    if run is None:
        return gr.Row(visible=False), ""
    folder = run.get("run_dir") or "(no directory)"
    return gr.Row(visible=True), (f"<div class='msg msg-error'>Delete run <code>{views.esc(run_id)}</code>, its "
                                  f"metrics and evaluations, and the directory <code>{views.esc(folder)}</code>? "
                                  "This cannot be undone.</div>")


def delete(state: AppState, run_id: str | None, current: str | None):
    store = state.store()
    run = store.get_run(run_id) if run_id else None
    keep_buttons = (gr.skip(), gr.skip(), gr.skip())
    if run is None:
        return views.message("That run no longer exists.", "info"), gr.Row(visible=False), table(state), \
            gr.skip(), *keep_buttons
    if any(j["status"] in ACTIVE for j in store.list_jobs(run_id)):
        return views.message(f"Run {run_id} is still running: cancel it first (Recipe tab).", "error"), \
            gr.Row(visible=False), gr.skip(), gr.skip(), *keep_buttons
    store.delete_run(run_id)
    removed = remove_run_dir(state.workdir, run.get("run_dir"))
    left = store.list_runs()
    selected = current if current != run_id else (left[0]["id"] if left else None)
    note = f"Deleted run {run_id}" + (f" and {run['run_dir']}." if removed else ".")
    return views.message(note, "ok"), gr.Row(visible=False), table(state), state.select_run(selected), None, \
        gr.Button(interactive=False), gr.Button(interactive=False)


def remove_run_dir(workdir: Path, run_dir: str | None) -> bool:
    """Remove a run directory, but only one inside <workspace>/runs/ (a corrupted DB row must not rm -rf elsewhere)."""
    if not run_dir:
        return False
    target = Path(run_dir).resolve()
    runs_root = (workdir / "runs").resolve()
    if runs_root not in target.parents or not target.is_dir():
        return False
    shutil.rmtree(target)
    return True
