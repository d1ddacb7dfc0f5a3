"""Home tab: the pipeline at a glance for the selected run, the recipe picker and "Run the whole recipe", the results
table as it fills in, Cancel / Resume, and every failed job's error, advice and log lines."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from engine.runs import UserError, resume_note, resume_run, validate_inputs
from engine.recipe.configs import EvalConfig, ExportConfig, ModelConfig, Recipe
from engine.recipe.files import RecipeError, recipe_to_yaml
from engine.evaluation.results import summary, table_rows
from engine.runtime.worker import ensure_engine, request_cancel
from ui import charts, hardware, run_data, views
from ui.forms import build_form
from ui.state import (DEFAULT_RECIPE, AppState, cuda_available, load_recipe_file, recipe_command, recipe_names,
                      skip_unchanged)


EMPTY_RESULTS = ["model", "pass %", "eval loss", "weight rel. err"]


def build(state: AppState) -> None:
    initial = load_recipe_file(DEFAULT_RECIPE).model_dump(mode="json")
    state.base = gr.State(initial)
    with gr.Row(equal_height=False):
        state.picker = gr.Dropdown(recipe_names(), value=DEFAULT_RECIPE, label="Recipe", scale=2,
                                   info="assets/recipes/*.yaml; the Dataset, SFT and QAT tabs edit its sections",
                                   elem_id="recipe-picker")
        with gr.Column(scale=1, min_width=220):
            run_button = gr.Button("▶ Run the whole recipe", variant="primary", elem_id="run-recipe")
            show_button = gr.Button("Show YAML / CLI command", size="sm")
    notice = gr.HTML()
    with gr.Accordion("Recipe as YAML and as a CLI command", open=False) as yaml_box:
        command = gr.Code(language="shell", label="CLI", lines=2, interactive=False)
        yaml_text = gr.Code(language="yaml", label="recipe.yaml", lines=12, interactive=False)

    pipeline = gr.HTML(views.pipeline_html([]), elem_id="pipeline")
    with gr.Row(equal_height=True):
        status_line = gr.HTML(elem_id="run-status", scale=4)
        cancel = gr.Button("■ Cancel run", variant="stop", size="sm", scale=0, min_width=130, interactive=False)
        resume = gr.Button("↻ Resume run", size="sm", scale=0, min_width=130, interactive=False)
    results = gr.Dataframe(pd.DataFrame(columns=EMPTY_RESULTS), label="Results (fills in as each stage is evaluated)",
                           interactive=False,
                           elem_id="results-table", wrap=True)
    results_note = gr.HTML(elem_id="results-note")
    problems = gr.HTML(elem_id="problems")
    with gr.Accordion("Machine telemetry during this run", open=False):
        telemetry_plot = gr.Plot(show_label=False)
    with gr.Accordion("More recipe settings: name, model, evaluation, export", open=False):
        _other_forms(state, initial)
    with gr.Accordion("Hardware: GPUs, multi-GPU / multi-machine launch, will it fit?", open=False):
        hardware.build(state, initial)

    cache = gr.State({})
    outputs = [pipeline, status_line, results, results_note, problems, cancel, resume, cache]
    timer = state.tab_timer("recipe")
    timer.tick(lambda run_id, c: refresh(state, run_id, c), [state.run, cache], outputs,
               show_progress="hidden", concurrency_limit=None)
    slow = gr.Timer(10.0)
    slow.tick(lambda run_id: telemetry_figure(state, run_id), state.run, telemetry_plot, show_progress="hidden")

    def wire() -> None:  # after every tab registered its form: the draft's inputs exist now
        inputs = state.recipe_inputs()
        state.run.change(lambda run_id: refresh(state, run_id, {}), state.run, outputs, show_progress="hidden")
        state.run.change(lambda run_id: telemetry_figure(state, run_id), state.run, telemetry_plot,
                         show_progress="hidden")
        run_button.click(lambda data: start_run(state, data), inputs, [notice, state.run])
        show_button.click(lambda data: show_recipe(state, data), inputs | {state.picker},
                          [command, yaml_text, notice]).then(lambda: gr.Accordion(open=True), None, yaml_box)
        state.picker.change(lambda name: pick_recipe(state, name), state.picker,
                            [state.base, notice, *state.form_outputs()])
        cancel.click(lambda run_id: cancel_clicked(state, run_id), state.run, notice)
        resume.click(lambda run_id: resume_clicked(state, run_id), state.run, notice)

    state.after_build(wire)


def _other_forms(state: AppState, recipe: dict) -> None:
    state.add_form(build_form("", Recipe, recipe, only=["name"]))
    for section, model in (("model", ModelConfig), ("eval", EvalConfig), ("export", ExportConfig)):
        gr.Markdown(f"**{section}**")
        state.add_form(build_form(section, model, recipe.get(section)))


# ---- handlers --------------------------------------------------------------------------------------------------


def refresh(state: AppState, run_id: str | None, cache: dict):
    """Everything run-specific on this tab; outputs that did not change are skipped (no flicker, less traffic)."""
    store = state.store()
    run = store.get_run(run_id) if run_id else None
    if run is None:
        values = [views.pipeline_html([]), "", pd.DataFrame(columns=EMPTY_RESULTS), "", "", False, False]
    else:
        jobs = store.list_jobs(run_id)
        statuses = {j["status"] for j in jobs}
        values = [
            views.pipeline_html(run_data.pipeline_cards(store, run_id)),
            _status_html(run, jobs),
            pd.DataFrame(table_rows(summary(store, run_id))) if store.evals(run_id) else
            pd.DataFrame(columns=EMPTY_RESULTS),
            views.message(run_data.short_training_note(run), "info"),
            views.problems_html(run_data.problem_jobs(store, run_id)),
            bool(statuses & {"queued", "running"}),  # Cancel enabled
            bool(statuses & {"failed", "interrupted", "cancelled"}),  # Resume enabled
        ]
    shown = skip_unchanged(cache, values)
    shown[5:7] = [v if not isinstance(v, bool) else gr.Button(interactive=v) for v in shown[5:7]]
    return [*shown, cache]


def _status_html(run: dict, jobs: list[dict]) -> str:
    done = sum(j["status"] == "succeeded" for j in jobs)
    took = run_data.fmt_duration(run_data.run_seconds(run))
    return (f"<div class='runline'>{views.badge(run['status'])} <b>{views.esc(run['name'])}</b> "
            f"<code>{views.esc(run['id'])}</code> · {done}/{len(jobs)} jobs done · {took}</div>")


def telemetry_figure(state: AppState, run_id: str | None):
    if not run_id:
        return charts.empty("no run selected", 260)
    return charts.telemetry_figure(state.store().telemetry(run_id=run_id, limit=2000))


def start_run(state: AppState, data: dict):
    """Validate the draft with the engine's own checks, queue it, make sure the engine runs, select the run."""
    try:
        recipe = state.draft_recipe(data)
        validate_inputs(recipe)
    except (RecipeError, UserError) as exc:
        return views.message(f"Not started:\n{exc}", "error"), gr.skip()
    from engine.runtime.pipeline import enqueue

    run_id = enqueue(state.store(), recipe, state.workdir, cuda_available=cuda_available())
    try:
        ensure_engine(state.workdir)
    except RuntimeError as exc:
        return views.message(f"Run {run_id} is queued, but the engine did not start: {exc}", "error"), \
            state.select_run(run_id)
    jobs = len(state.store().list_jobs(run_id))
    return views.message(f"Run {run_id} queued ({jobs} jobs); the engine is running it.", "ok"), \
        state.select_run(run_id)


def show_recipe(state: AppState, data: dict):
    try:
        recipe = state.draft_recipe(data)
    except RecipeError as exc:
        return gr.skip(), gr.skip(), views.message(str(exc), "error")
    return recipe_command(data[state.picker], recipe), recipe_to_yaml(recipe), ""


def pick_recipe(state: AppState, name: str):
    try:
        recipe = load_recipe_file(name).model_dump(mode="json")
    except RecipeError as exc:
        return gr.skip(), views.message(str(exc), "error"), *[gr.skip()] * len(state.form_outputs())
    return recipe, views.message(f"Loaded {name}.yaml into the forms.", "ok"), *state.form_updates(recipe)


def cancel_clicked(state: AppState, run_id: str | None) -> str:
    if not run_id:
        return views.message("No run selected.", "error")
    store = state.store()
    touched = [request_cancel(store, j["id"]) for j in store.list_jobs(run_id) if j["status"] in ("queued", "running")]
    return views.message(f"Cancelling {len(touched)} jobs of run {run_id}; running ones stop within seconds.", "ok")


def resume_clicked(state: AppState, run_id: str | None) -> str:
    if not run_id:
        return views.message("No run selected.", "error")
    store = state.store()
    requeued = resume_run(store, run_id)
    if not requeued:
        return views.message("Nothing to resume: no failed, interrupted or cancelled jobs.", "info")
    ensure_engine(state.workdir)
    trainers = [store.get_job(i) for i in requeued]
    notes = "; ".join(f"{j['config']['key']} {resume_note(store, j)}" for j in trainers if j["stage"] in ("sft", "qat"))
    return views.message(f"Re-queued {len(requeued)} jobs{': ' + notes if notes else ''}.", "ok")
