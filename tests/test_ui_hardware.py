"""The Recipe tab's hardware panel: GPU picker, the fit estimate for the draft recipe, each machine's launch command."""

from __future__ import annotations

import gradio as gr
import pytest

from engine.recipe.files import load_recipe
from engine.training.estimate import estimate_recipe
from ui import hardware, views
from ui.state import RECIPES_DIR, AppState

DEMO = load_recipe(RECIPES_DIR / "demo.yaml").model_dump(mode="json")


def panel(workdir, recipe: dict) -> AppState:
    state = AppState(workdir)
    with gr.Blocks():
        state.base = gr.State(recipe)
        hardware.build(state, recipe)
    return state


def browser_data(state: AppState, recipe: dict, **hardware_values) -> dict:
    """{component: value} as a click handler receives it: the initial values, some changed by the user."""
    form = state.forms["hardware"]
    data = {state.base: recipe, **{c: c.value for c in form.inputs}}
    for name, value in hardware_values.items():
        data[form.components[name]] = value
    return data


def test_without_a_gpu_the_panel_says_so_once_and_takes_indices_as_text(workdir, monkeypatch):
    """No eight 'cuda:N (not on this machine)' boxes and no NVML class names: one sentence, one text field."""
    from engine.runtime import telemetry

    monkeypatch.setattr(telemetry, "_nvml_state", {"ready": None, "note": None})
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # as on a machine without nvidia-ml-py
    state = AppState(workdir)
    with gr.Blocks() as blocks:
        state.base = gr.State(DEMO)
        hardware.build(state, DEMO)
    texts = [b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown) and "hardware" in str(b.value)]
    assert texts == ["**hardware** · No NVIDIA GPU on this machine (nvidia-ml-py is not installed): training runs "
                     "on CPU."]
    picker = state.forms["hardware"].components["gpus"]
    assert isinstance(picker, gr.Textbox) and "this machine has none" in picker.info
    assert state.draft_recipe(browser_data(state, DEMO, gpus="")).hardware.gpus is None
    recipe = state.draft_recipe(browser_data(state, DEMO, gpus="0,1", strategy="ddp", num_processes=2))
    assert recipe.hardware.gpus == [0, 1]
    assert state.forms["hardware"].updates({"gpus": [2, 3]})[list(state.forms["hardware"].components).index("gpus")] \
        == "2,3"


def test_no_gpu_reasons_are_plain_words():
    class NVMLError_LibraryNotFound(Exception):  # the class name pynvml raises when libnvidia-ml.so is missing
        pass

    assert telemetry_note(NVMLError_LibraryNotFound()) == "No NVIDIA GPU on this machine (no NVIDIA driver installed)"
    assert "LibraryNotFound" not in telemetry_note(NVMLError_LibraryNotFound())


def telemetry_note(exc):
    from engine.runtime import telemetry

    return telemetry.no_gpu_note(exc)


def test_gpu_picker_names_the_gpus_nvml_sees_and_reads_back_as_the_config_wants(workdir, fake_gpu):
    state = panel(workdir, DEMO)
    picker = state.forms["hardware"].components["gpus"]
    assert isinstance(picker, gr.CheckboxGroup) and [c[1] for c in picker.choices] == list(range(8))
    assert picker.choices[0] == ("cuda:0 · NVIDIA H100 80GB HBM3 · 80 GiB", 0)
    assert picker.choices[1] == ("cuda:1 (not on this machine)", 1)
    assert state.draft_recipe(browser_data(state, DEMO, gpus=[])).hardware.gpus is None  # nothing ticked
    recipe = state.draft_recipe(browser_data(state, DEMO, gpus=[0, 1], strategy="ddp", num_processes=2))
    assert recipe.hardware.gpus == [0, 1] and recipe.hardware.strategy == "ddp"
    # a recipe pick fills the picker with a list, not the '0,1' text other list fields get
    assert state.forms["hardware"].updates({"gpus": [2, 3]})[list(state.forms["hardware"].components).index("gpus")] \
        == [2, 3]


def test_fit_estimate_for_the_demo_and_for_gpt_oss_20b(workdir):
    state = panel(workdir, DEMO)
    html = hardware.estimate_html(state, browser_data(state, DEMO))
    assert "SFT: full on 1 GPU(s), single" in html and "QAT: full" in html and "fits:" in html
    big = {**DEMO, "model": {**DEMO["model"], "source": "openai/gpt-oss-20b"}}
    html = hardware.estimate_html(state, browser_data(state, big))
    assert "does not fit" in html and "20.9 B parameters" in html and "suggestion: use 16 GPUs with ZeRO-3" in html
    disk = estimate_recipe(state.draft_recipe(browser_data(state, big)), "sft", hardware.cuda_available())["disk_gib"]
    assert disk["total"] > 39 and f"Disk: the run writes about {disk['total']:.1f} GiB" in html  # full: model copies
    broken = browser_data(state, DEMO, num_processes=0)
    assert "num_processes" in hardware.estimate_html(state, broken)  # the engine's own validation message


def test_estimate_names_the_field_when_the_model_cannot_be_sized():
    recipe = load_recipe(RECIPES_DIR / "demo.yaml", {"model.source": "someone/unknown-model"})
    with pytest.raises(ValueError, match="model.source: 'someone/unknown-model': no config.json"):
        estimate_recipe(recipe, "sft", cuda=False)


def test_launch_preview_shows_every_machines_command(workdir):
    state = panel(workdir, DEMO)
    code, note = hardware.launch_preview(state, browser_data(
        state, DEMO, strategy="ddp", num_processes=4, num_machines=2, main_process_ip="10.0.0.5"))
    assert note == "" and code.visible
    text = code.value
    assert "# machine rank 0 (this machine" in text and "# machine rank 1\n" in text
    assert "--machine_rank 1" in text and "--num_machines 2" in text and "--main_process_ip 10.0.0.5" in text
    assert "distributed_type: MULTI_GPU" in text and "--job <job id>" in text
    code, note = hardware.launch_preview(state, browser_data(state, DEMO))
    assert not code.visible and "strategy &#x27;single&#x27;: one process" in note


def test_launch_commands_of_a_started_job_are_listed():
    html = views.launch_html([{"key": "sft", "path": "/w/runs/r/accelerate/2-sft.yaml",
                               "meta": {"commands": ["cd /repo && accelerate launch --machine_rank 0 <x>",
                                                     "cd /repo && accelerate launch --machine_rank 1 <x>"]}}])
    assert "sft: accelerate launch, 2 machine(s)" in html and "--machine_rank 1 &lt;x&gt;" in html


def test_the_whole_app_builds_on_a_gpu_machine(workdir, fake_gpu, monkeypatch):
    """On a real H100 the app did not build: the hardware panel's GPU listing raised (fixed in engine/runtime/telemetry.py)."""
    from ui import header
    from ui.app import build_app

    build_app(workdir)
    monkeypatch.setattr(header, "_cache", {"at": 0.0, "html": ""})  # a fresh snapshot, not another test's
    html = header.telemetry_html(AppState(workdir))
    assert "GPU0" in html and "87%" in html
