"""What the SFT and QAT tabs share: live charts of a training stage, its jobs' status, the log tail, and the
Cancel / Resume / "Show YAML / CLI" buttons.

Charts poll storage with `since_id`, so each tick reads only the metric rows logged since the last one; the figure
is rebuilt only when rows arrived (otherwise the tick returns gr.skip() and the browser redraws nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from engine.training.recipe_advisor import qat_recovery
from engine.recipe.files import RecipeError, recipe_to_yaml
from engine.runs import resume_note
from engine.runtime.worker import ensure_engine, request_cancel
from ui import charts, run_data, views
from ui.palette import STATUS_COLORS
from ui.state import AppState, recipe_command, skip_unchanged

METRICS = ["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s"]


@dataclass
class TrainingView:
    stage: str  # "sft" or "qat"
    jobs: gr.HTML
    chart: gr.Plot
    note: gr.HTML
    log: gr.HTML
    cache: gr.State

    @property
    def outputs(self) -> list:
        return [self.jobs, self.chart, self.note, self.log, self.cache]


def build(state: AppState, stage: str) -> TrainingView:
    jobs = gr.HTML(elem_id=f"{stage}-jobs")
    chart = gr.Plot(charts.empty("no training metrics yet"), show_label=False, elem_id=f"{stage}-charts")
    note = gr.HTML(elem_id=f"{stage}-note")
    gr.Markdown("**Log** (last 40 lines, read from the job's log file)")
    log = gr.HTML(elem_id=f"{stage}-log")
    view = TrainingView(stage, jobs, chart, note, log, gr.State({}))
    # No state.run.change here: a new run resets the cache (it is keyed by run id) on the next tick, <= 1.5 s.
    gr.on(state.shown(stage), lambda run_id, cache: refresh(state, view.stage, run_id, cache),
          [state.run, view.cache], view.outputs, show_progress="hidden", concurrency_limit=None)
    return view


def stage_jobs(store, run_id: str, stage: str) -> list[dict]:
    return [j for j in store.list_jobs(run_id) if j["stage"] == stage]


def refresh(state: AppState, stage: str, run_id: str | None, cache: dict):
    store = state.store()
    if not run_id or store.get_run(run_id) is None:
        if cache.get("run") == "":
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), cache
        return "<div class='jobline'>no run selected</div>", charts.empty("no run selected"), "", "", {"run": ""}
    jobs = stage_jobs(store, run_id, stage)
    if cache.get("run") != run_id:
        cache = {"run": run_id, "last_id": 0, "series": {}, "keys": {}}
    changed = _read_new_rows(store, run_id, cache)
    figure = gr.skip()
    if changed or "drawn" not in cache:
        mine = {key: series for key, series in cache["series"].items() if key.split(":")[0] == stage}
        figure = charts.training_figure(mine, _reference(cache, stage)) if mine \
            else charts.empty(f"no {stage.upper()} metrics yet: they appear here within 2 s of each logged step")
    cache["drawn"] = True
    stopped = [j for j in jobs if j["status"] in ("failed", "interrupted", "cancelled")]
    status = "".join(views.job_line(j) for j in jobs if j not in stopped) or ("" if stopped else views.job_line(None))
    waiting = waiting_for(store, run_id, jobs)
    status += "".join(f"<div class='jobline waiting'>waiting for {views.job_line(j, inline=True)}</div>"
                      for j in waiting)
    problems = views.problems_html([{**j, "key": j["config"]["key"], "log_tail": ""} for j in stopped])
    launches = views.launch_html(_launches(store, run_id, jobs))
    status_html, note, log = skip_unchanged(cache, [status + launches + problems, _note(stage, cache),
                                                    _log(jobs) or _log(waiting)])
    return status_html, figure, note, log, cache


def waiting_for(store, run_id: str, jobs: list[dict]) -> list[dict]:
    """While this stage's jobs are queued and none runs: the run's jobs running now (e.g. prepare pre-training the
    tiny model, ~2 minutes on the first run), so the tab does not just say 'queued'."""
    if not any(j["status"] == "queued" for j in jobs) or any(j["status"] in ("running", "cancelling") for j in jobs):
        return []
    mine = {j["id"] for j in jobs}
    return [j for j in store.list_jobs(run_id) if j["status"] in ("running", "cancelling") and j["id"] not in mine]


def _launches(store, run_id: str, jobs: list[dict]) -> list[dict]:
    keys = {j["id"]: j["config"]["key"] for j in jobs}
    return [{**a, "key": keys[a["job_id"]]} for a in store.artifacts(run_id, kind="launch") if a["job_id"] in keys]


def _read_new_rows(store, run_id: str, cache: dict) -> bool:
    """Append metric rows logged since the last tick to cache['series']; True if any arrived."""
    rows = store.metrics(run_id=run_id, names=METRICS, since_id=cache["last_id"])
    if not rows:
        return False
    keys = cache["keys"]
    if any(str(r["job_id"]) not in keys for r in rows):
        keys.update({str(j["id"]): j["config"]["key"] for j in store.list_jobs(run_id)})
    for row in sorted(rows, key=lambda r: r["id"]):
        if row["value"] is None:
            continue
        steps, values = cache["series"].setdefault(keys[str(row["job_id"])], {}).setdefault(row["name"], [[], []])
        while steps and steps[-1] >= row["step"]:  # a resumed job re-logs steps after its checkpoint: replace them
            steps.pop()
            values.pop()
        steps.append(row["step"])
        values.append(row["value"])
    cache["last_id"] = max(r["id"] for r in rows)
    return True


def _reference(cache: dict, stage: str) -> dict[str, float] | None:
    """On the QAT tab: the SFT eval loss as the level QAT should recover to."""
    if stage != "qat":
        return None
    sft = cache["series"].get("sft", {}).get("eval_loss")
    return {"SFT level": sft[1][-1]} if sft and sft[1] else None


def _note(stage: str, cache: dict) -> str:
    if stage != "qat":
        return ""
    reference = _reference(cache, stage)
    lines = []
    for key, metrics in cache["series"].items():
        if key.startswith("qat:"):
            steps, values = metrics.get("eval_loss", [[], []])
            result = qat_recovery(reference["SFT level"] if reference else None, list(zip(steps, values)))
            state = views.pill(*_recovery_label(result))
            lines.append(f"<li>{state} <b>{key.split(':')[1].upper()}</b>: {views.esc(result.message)}</li>")
    return f"<div class='advisor'><b>QAT recovery</b><ul>{''.join(lines)}</ul></div>" if lines else ""


def _recovery_label(result) -> tuple[str, str]:
    if result.recovered:
        return ("done", STATUS_COLORS["succeeded"]) if result.plateaued else ("recovered", "#52b788")
    return ("plateaued", STATUS_COLORS["cancelled"]) if result.plateaued else ("recovering", STATUS_COLORS["running"])


def _log(jobs: list[dict]) -> str:
    """The running job's log tail, else the one that ran last."""
    started = [j for j in jobs if j.get("log_path")]
    if not started:
        return ""
    job = next((j for j in started if j["status"] in ("running", "cancelling")),
               max(started, key=lambda j: j.get("started_at") or 0))
    return (f"<div class='note'>{views.esc(job['config']['key'])} · <code>{views.esc(job['log_path'])}</code></div>"
            + views.logbox(run_data.log_tail(job["log_path"], 40), tall=True))


# ---- buttons shared by both tabs -------------------------------------------------------------------------------


def cancel_stage(state: AppState, run_id: str | None, stage: str) -> str:
    if not run_id:
        return views.message("No run selected.", "error")
    store = state.store()
    active = [j for j in stage_jobs(store, run_id, stage) if j["status"] in ("queued", "running")]
    for job in active:
        request_cancel(store, job["id"])
    if not active:
        return views.message(f"No queued or running {stage.upper()} job in run {run_id}.", "info")
    return views.message(f"Cancelling {', '.join(j['config']['key'] for j in active)}.", "ok")


def resume_stage(state: AppState, run_id: str | None, stage: str) -> str:
    if not run_id:
        return views.message("No run selected.", "error")
    store = state.store()
    stopped = [j for j in stage_jobs(store, run_id, stage) if j["status"] in ("failed", "interrupted", "cancelled")]
    for job in stopped:
        store.requeue_job(job["id"])  # its skipped dependants (evaluations, export) come back too
    if not stopped:
        return views.message(f"Nothing to resume: no stopped {stage.upper()} job in run {run_id}.", "info")
    ensure_engine(state.workdir)
    notes = "; ".join(f"{j['config']['key']} {resume_note(store, j)}" for j in stopped)
    return views.message(f"Resuming: {notes}.", "ok")


def yaml_and_command(state: AppState, data: dict, **replace: dict):
    """(CLI line, YAML, message) for the draft with `replace` sections applied."""
    try:
        recipe = state.draft_recipe(data, **replace)
    except RecipeError as exc:
        return gr.skip(), gr.skip(), views.message(str(exc), "error")
    return recipe_command(data[state.picker], recipe), recipe_to_yaml(recipe), ""


def preset_values(form, preset: str) -> list:
    """Form values for a preset: 'nvidia' = the config defaults (NVIDIA's recipe), 'demo' = assets/recipes/demo.yaml."""
    from ui.state import load_recipe_file

    if preset == "nvidia":
        return form.updates({})
    return form.updates(load_recipe_file("demo").model_dump(mode="json").get(form.section, {}))


PRESETS = [("NVIDIA recipe (the config defaults)", "nvidia"), ("tiny CPU demo (assets/recipes/demo.yaml)", "demo")]
