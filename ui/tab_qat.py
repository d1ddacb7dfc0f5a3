"""QAT tab: quantize the selected run's SFT model (PTQ baseline) and train it quantization-aware, per FP4 format.
Start extends the selected run (engine.runtime.pipeline.extend) with PTQ -> QAT -> evaluation -> export for the chosen
formats. Before starting: which modules get quantizers, and the recipe advisor's warnings."""

from __future__ import annotations

import re

import gradio as gr
import pandas as pd

from engine.training.recipe_advisor import recipe_advice
from engine.recipe.configs import QATConfig, QuantConfig, Recipe
from engine.runtime.pipeline import extend
from engine.recipe.files import RecipeError
from engine.runtime.worker import ensure_engine
from ui import quant_table, training_view, views
from ui.forms import build_form
from ui.state import AppState, cuda_available, skip_unchanged


def build(state: AppState) -> None:
    gr.Markdown("Quantize the **selected run's** SFT model to FP4 (the PTQ baseline) and recover its accuracy with "
                "QAT, at about a tenth of the SFT learning rate. **Start QAT** adds PTQ → QAT → evaluation → "
                "export for each chosen format to that run.")
    preset = gr.Radio(training_view.PRESETS, value=None, label="Preset", elem_id="qat-preset")
    with gr.Accordion("Formats and calibration (from QuantConfig)", open=True):
        quant_form = state.add_form(build_form("ptq", QuantConfig, state.base.value.get("ptq")))
    with gr.Accordion("QAT settings (from QATConfig)", open=False):
        qat_form = state.add_form(build_form("qat", QATConfig, state.base.value.get("qat"), per_row=4))
    with gr.Row():
        with gr.Column(scale=3):
            quant_note = gr.HTML()
            quantizers = gr.Dataframe(label="Which modules get quantizers", interactive=False, max_height=260,
                                      elem_id="quantizer-table", wrap=True,
                                      column_widths=["9%", "27%", "28%", "10%", "18%", "8%"])
        advisor = gr.HTML(elem_id="qat-advisor", scale=2)
    with gr.Row():
        start = gr.Button("▶ Start QAT on the selected run", variant="primary", elem_id="qat-start")
        cancel = gr.Button("■ Cancel", variant="stop")
        resume = gr.Button("↻ Resume")
        show = gr.Button("Show YAML / CLI command")
    notice = gr.HTML()
    with gr.Accordion("The run's recipe with this QAT as YAML and as a CLI command", open=False) as yaml_box:
        command = gr.Code(language="shell", label="CLI", lines=2, interactive=False)
        yaml_text = gr.Code(language="yaml", label="recipe.yaml", lines=12, interactive=False)
    training_view.build(state, "qat")

    both = quant_form.inputs + qat_form.inputs
    preset.change(lambda p: training_view.preset_values(quant_form, p) + training_view.preset_values(qat_form, p),
                  preset, both)
    cancel.click(lambda run_id: training_view.cancel_stage(state, run_id, "qat"), state.run, notice)
    resume.click(lambda run_id: training_view.resume_stage(state, run_id, "qat"), state.run, notice)
    shown = gr.State({})
    fmt_inputs = [state.run, quant_form.components["formats"], quant_form.components["block_size"], shown]
    gr.on([*state.shown("qat"), quant_form.components["formats"].change],
          lambda run_id, fmts, block, cache: [*skip_unchanged(cache, quantizer_table(state, run_id, fmts, block)),
                                              cache],
          fmt_inputs, [quantizers, quant_note, shown], show_progress="hidden", trigger_mode="always_last")

    def wire() -> None:
        inputs = state.recipe_inputs() | {state.run}
        seen = gr.State({})
        gr.on([*state.shown("qat"), *(c.change for c in both)],
              lambda data: [*skip_unchanged(data[seen], [advise(state, data)]), data[seen]], inputs | {seen},
              [advisor, seen], show_progress="hidden", trigger_mode="always_last")
        start.click(lambda data: start_qat(state, data), inputs, [notice, state.run])
        show.click(lambda data: show_qat(state, data), inputs | {state.picker}, [command, yaml_text, notice]) \
            .then(lambda: gr.Accordion(open=True), None, yaml_box)

    state.after_build(wire)


# ---- handlers --------------------------------------------------------------------------------------------------


def qat_recipe(state: AppState, data: dict) -> tuple[Recipe, dict | None]:
    """(the recipe Start would use, the run it extends). With a run selected: the run's recipe with this tab's
    ptq/qat sections (QAT on); without one: the draft (the advisor still has something to say). RecipeError."""
    store = state.store()
    run = store.get_run(data[state.run]) if data[state.run] else None
    sections = {"ptq": state.forms["ptq"].read(data), "qat": {**state.forms["qat"].read(data), "enabled": True}}
    if run is None:
        return state.draft_recipe(data, **sections), None
    from ui.forms import assemble

    return assemble(run["recipe"], sections, filename=f"run {run['id']}"), run


def _run_facts(store, run: dict | None) -> dict:
    """What the advisor needs to know about the run QAT would continue from."""
    if run is None:
        return {}
    jobs = store.list_jobs(run["id"])
    prepare = next((j for j in jobs if j["stage"] == "prepare"), None)
    rows = re.search(r"train_rows (\d+)", (prepare or {}).get("message") or "")
    return {"has_sft": any(j["stage"] == "sft" for j in jobs),
            "sft_lr": run["recipe"].get("sft", {}).get("learning_rate"),
            "sft_data": run["recipe"].get("data", {}).get("source"),
            "train_rows": int(rows[1]) if rows else None}


def advise(state: AppState, data: dict) -> str:
    try:
        recipe, run = qat_recipe(state, data)
    except RecipeError as exc:
        return views.message(str(exc), "error")
    facts = _run_facts(state.store(), run)
    title = f"Recipe advisor for run {run['id']}" if run else "Recipe advisor (no run selected: the draft)"
    return views.advice_html(recipe_advice(recipe, **facts), title)


def start_qat(state: AppState, data: dict):
    run_id = data[state.run]
    if not run_id:
        return views.message("Select a run with an SFT stage first (start one from the SFT tab).", "error"), gr.skip()
    try:
        recipe, run = qat_recipe(state, data)
    except RecipeError as exc:
        return views.message(f"Not started:\n{exc}", "error"), gr.skip()
    store = state.store()
    if not _run_facts(store, run).get("has_sft"):
        return views.message(f"Run {run_id} has no SFT stage: QAT continues from SFT weights. Start an SFT run "
                             "first, or use 'Run the whole recipe' on the Recipe tab.", "error"), gr.skip()
    before = {j["config"]["key"] for j in store.list_jobs(run_id)}
    added = extend(store, run_id, recipe, cuda_available=cuda_available())
    new = [j["config"]["key"] for j in store.list_jobs(run_id) if j["id"] in added and j["config"]["key"] not in before]
    if not new:
        return views.message(f"Run {run_id} already has QAT for {', '.join(recipe.ptq.formats)}; pick another "
                             "format, or Resume a stopped one.", "info"), gr.skip()
    ensure_engine(state.workdir)
    return views.message(f"Added to run {run_id}: {', '.join(new)}.", "ok"), state.select_run(run_id)


def show_qat(state: AppState, data: dict):
    from engine.recipe.files import recipe_to_yaml
    from ui.state import recipe_command

    try:
        recipe, _ = qat_recipe(state, data)
    except RecipeError as exc:
        return gr.skip(), gr.skip(), views.message(str(exc), "error")
    return recipe_command(data[state.picker], recipe), recipe_to_yaml(recipe), ""


def quantizer_table(state: AppState, run_id: str | None, formats: list[str], block_size):
    run = state.store().get_run(run_id) if run_id else None
    rows, notes = [], []
    for fmt in formats or []:
        found, source = quant_table.summary_for(state.workdir, (run or {}).get("run_dir"), fmt,
                                                int(block_size) if block_size else None)
        notes.append(f"<b>{fmt.upper()}</b>: {views.esc(source)}")
        rows += quant_table.folded_rows(found, fmt) if found else []
    if not formats:
        notes.append("pick at least one format")
    return [pd.DataFrame(rows), "<div class='note'>" + " · ".join(notes) + "</div>"]
