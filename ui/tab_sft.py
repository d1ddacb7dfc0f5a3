"""SFT tab: supervised fine-tuning in BF16. The form is generated from SFTConfig; Start queues a new run that does
SFT only (plus the evaluation of the original and SFT models), so QAT can be added to it later from the QAT tab."""

from __future__ import annotations

import gradio as gr

from engine.runs import UserError, validate_inputs
from engine.recipe.configs import SFTConfig
from engine.runtime.pipeline import enqueue
from engine.recipe.files import RecipeError
from engine.runtime.worker import ensure_engine
from ui import training_view, views
from ui.forms import build_form
from ui.state import AppState, cuda_available

# Start = an SFT-only run: no PTQ/QAT formats (QAT is added later with `extend`).
SFT_ONLY = {"ptq": {"formats": []}, "qat": {"enabled": False}, "sft": {"enabled": True}}


def build(state: AppState) -> None:
    gr.Markdown("Fine-tune the model in BF16 on the Dataset tab's data. **Start SFT** queues a new run with SFT "
                "only (and the evaluation of the original and fine-tuned model); add QAT to it from the QAT tab.")
    preset = gr.Radio(training_view.PRESETS, value=None, label="Preset", elem_id="sft-preset")
    with gr.Accordion("SFT settings (from SFTConfig; each field's help text is under it)", open=True):
        form = state.add_form(build_form("sft", SFTConfig, state.base.value.get("sft"), per_row=4))
    with gr.Row():
        start = gr.Button("▶ Start SFT (new run)", variant="primary", elem_id="sft-start")
        cancel = gr.Button("■ Cancel", variant="stop")
        resume = gr.Button("↻ Resume")
        show = gr.Button("Show YAML / CLI command")
    notice = gr.HTML()
    with gr.Accordion("The SFT-only recipe as YAML and as a CLI command", open=False) as yaml_box:
        command = gr.Code(language="shell", label="CLI", lines=2, interactive=False)
        yaml_text = gr.Code(language="yaml", label="recipe.yaml", lines=12, interactive=False)
    training_view.build(state, "sft")

    preset.change(lambda p: training_view.preset_values(form, p), preset, form.inputs)
    cancel.click(lambda run_id: training_view.cancel_stage(state, run_id, "sft"), state.run, notice)
    resume.click(lambda run_id: training_view.resume_stage(state, run_id, "sft"), state.run, notice)

    def wire() -> None:
        inputs = state.recipe_inputs()
        start.click(lambda data: start_sft(state, data), inputs, [notice, state.run])
        show.click(lambda data: training_view.yaml_and_command(state, data, **SFT_ONLY), inputs | {state.picker},
                   [command, yaml_text, notice]).then(lambda: gr.Accordion(open=True), None, yaml_box)

    state.after_build(wire)


def start_sft(state: AppState, data: dict):
    try:
        recipe = state.draft_recipe(data, **SFT_ONLY)
        validate_inputs(recipe)
    except (RecipeError, UserError) as exc:
        return views.message(f"Not started:\n{exc}", "error"), gr.skip()
    run_id = enqueue(state.store(), recipe, state.workdir, cuda_available=cuda_available())
    ensure_engine(state.workdir)
    return views.message(f"Run {run_id} queued: SFT only. Watch it below; add QAT from the QAT tab.", "ok"), \
        state.select_run(run_id)
