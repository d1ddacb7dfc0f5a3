"""Forms generated from the typed configs: every field gets a component with its help text, values round-trip into
a valid Recipe, invalid values come back with the engine's own messages, and the CLI line reproduces the recipe."""

from __future__ import annotations

import shlex

import gradio as gr
import pytest

from cli.flags import leaf_fields, overrides_from_args
from engine.recipe.configs import (FORMAT_LABELS, DataConfig, EvalConfig, ExportConfig, HardwareConfig, ModelConfig,
                            QATConfig, QuantConfig, Recipe, SFTConfig)
from engine.recipe.files import RecipeError, load_recipe
from ui.forms import assemble, build_form, field_info
from ui.state import RECIPES_DIR, recipe_command

SECTIONS = {"model": ModelConfig, "data": DataConfig, "sft": SFTConfig, "ptq": QuantConfig, "qat": QATConfig,
            "eval": EvalConfig, "export": ExportConfig, "hardware": HardwareConfig}
DEMO = load_recipe(RECIPES_DIR / "demo.yaml")


def build_all(values: dict) -> dict:
    with gr.Blocks():
        forms = {s: build_form(s, model, values.get(s)) for s, model in SECTIONS.items()}
        forms[""] = build_form("", Recipe, values, only=["name"])
    return forms


def read_back(forms: dict, values: dict) -> dict:
    """What a handler sees: each component's value as the browser would send it (its initial value)."""
    return {section: form.read({c: c.value for c in form.inputs}) for section, form in forms.items()}


@pytest.mark.parametrize("recipe", [Recipe(), DEMO], ids=["defaults", "demo"])
def test_forms_round_trip_a_recipe(recipe):
    dumped = recipe.model_dump(mode="json")
    forms = build_all(dumped)
    assert assemble({}, read_back(forms, dumped)) == recipe


def test_every_recipe_field_has_a_component_with_help_text():
    forms = build_all(Recipe().model_dump(mode="json"))
    covered = {f"{s}.{name}" if s else name for s, form in forms.items() for name in form.components}
    assert covered == {dotted for dotted, _ in leaf_fields()}
    for form in forms.values():
        for name, component in form.components.items():
            assert component.label == name
            assert component.info and "default" in component.info


def test_component_types_follow_field_types():
    forms = build_all(Recipe().model_dump(mode="json"))
    assert isinstance(forms["sft"].components["gradient_checkpointing"], gr.Checkbox)
    assert isinstance(forms["sft"].components["lr_scheduler_type"], gr.Dropdown)
    assert isinstance(forms["sft"].components["max_steps"], gr.Number)
    assert forms["sft"].components["max_steps"].precision == 0
    formats = forms["ptq"].components["formats"]
    assert isinstance(formats, gr.CheckboxGroup)
    assert formats.choices == [(FORMAT_LABELS[f], f) for f in FORMAT_LABELS]


def test_help_text_shows_bounds_and_default():
    text = field_info(SFTConfig.model_fields["learning_rate"])
    assert "Peak learning rate" in text and "range (0, 1]" in text and "default 2e-05" in text
    assert "≥ 1" in field_info(SFTConfig.model_fields["logging_steps"])


def test_invalid_values_return_the_engines_messages():
    dumped = DEMO.model_dump(mode="json")
    forms = build_all(dumped)
    sections = read_back(forms, dumped)
    sections["sft"]["learning_rate"] = 0
    sections["qat"]["max_steps"] = 0
    with pytest.raises(RecipeError) as err:
        assemble({}, sections)
    text = str(err.value)
    assert "sft.learning_rate: Input should be greater than 0" in text
    assert "qat.max_steps" in text and "would train nothing" in text


def test_unparsable_text_reaches_the_engine_unchanged():
    forms = build_all(Recipe().model_dump(mode="json"))
    gpus = forms["hardware"].components["gpus"]
    data = {c: c.value for c in forms["hardware"].inputs} | {gpus: "0, x"}
    values = forms["hardware"].read(data)
    assert values["gpus"] == "0, x"
    with pytest.raises(RecipeError, match="hardware.gpus"):
        assemble({}, {"hardware": values})
    assert forms["hardware"].read(data | {gpus: "0, 1"})["gpus"] == [0, 1]
    assert forms["hardware"].read(data | {gpus: ""})["gpus"] is None


def test_optional_gpu_memory_limit_is_a_textbox_that_may_stay_empty():
    forms = build_all(Recipe().model_dump(mode="json"))
    limit = forms["hardware"].components["gpu_memory_limit_gib"]
    assert isinstance(limit, gr.Textbox) and "smaller card" in limit.info and "default none" in limit.info
    data = {c: c.value for c in forms["hardware"].inputs}
    assert assemble({}, {"hardware": forms["hardware"].read(data)}).hardware.gpu_memory_limit_gib is None
    capped = assemble({}, {"hardware": forms["hardware"].read(data | {limit: "79"})})
    assert capped.hardware.gpu_memory_limit_gib == 79.0
    with pytest.raises(RecipeError, match="hardware.gpu_memory_limit_gib"):
        assemble({}, {"hardware": forms["hardware"].read(data | {limit: "-1"})})


def test_cross_field_rule_is_reported():
    with pytest.raises(RecipeError, match="qat.enabled needs at least one format"):
        assemble({}, {"ptq": {"formats": []}, "qat": {"enabled": True}})


def test_presets_fill_the_form():
    from ui.training_view import preset_values

    with gr.Blocks():
        form = build_form("sft", SFTConfig, DEMO.sft.model_dump(mode="json"))
    nvidia = dict(zip(form.components, preset_values(form, "nvidia")))
    demo = dict(zip(form.components, preset_values(form, "demo")))
    assert nvidia["learning_rate"] == SFTConfig().learning_rate
    assert demo["learning_rate"] == DEMO.sft.learning_rate and demo["max_steps"] == DEMO.sft.max_steps


def test_cli_command_reproduces_the_recipe():
    from launch import build_parser

    changed = DEMO.model_copy(deep=True)
    changed.sft.learning_rate = 1e-3
    changed.ptq.formats = ["nvfp4"]
    changed.qat.enabled = True
    command = recipe_command("demo", changed)
    assert "--sft.learning_rate 0.001" in command and "--ptq.formats nvfp4" in command
    argv = shlex.split(command.replace("\\\n", " "))[2:]  # drop "python launch.py"
    args = build_parser().parse_args(argv)
    assert load_recipe(args.recipe, overrides_from_args(args)) == changed


def test_picking_a_recipe_fills_every_form_including_its_name(workdir):
    from ui.state import AppState, load_recipe_file

    state = AppState(workdir)
    with gr.Blocks():
        state.base = gr.State({})
        state.add_form(build_form("", Recipe, {}, only=["name"]))
        for section, model in SECTIONS.items():
            state.add_form(build_form(section, model, {}))
    smoke = load_recipe_file("smoke")
    values = state.form_updates(smoke.model_dump(mode="json"))
    data = dict(zip(state.form_outputs(), values)) | {state.base: {}}
    assert state.draft_recipe(data) == smoke


def test_run_button_shows_the_engines_errors_inline(workdir):
    from ui.state import AppState
    from ui.tab_recipe import start_run
    from ui.tab_sft import start_sft

    state = AppState(workdir)
    dumped = DEMO.model_dump(mode="json")
    with gr.Blocks():
        state.base = gr.State(dumped)
        for section, model in SECTIONS.items():
            state.add_form(build_form(section, model, dumped.get(section)))
    data = {c: c.value for c in state.form_outputs()} | {state.base: dumped}
    data[state.forms["sft"].components["learning_rate"]] = -1
    data[state.forms["data"].components["source"]] = "missing.jsonl"
    html, run_update = start_run(state, data)
    assert "Not started" in html and "sft.learning_rate: Input should be greater than 0" in html
    data[state.forms["sft"].components["learning_rate"]] = 1e-4
    html, run_update = start_sft(state, data)
    assert "missing.jsonl" in html and "file not found" in html  # engine.data.chat_data's check, before any run exists
    assert state.store().list_runs() == []
