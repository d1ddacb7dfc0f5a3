"""The Recipe tab's hardware panel: which GPUs (picked from NVML), how to spread training over them (accelerate
strategy, processes, machines), will it fit (engine/training/estimate.py), and the commands each machine runs.

The form is generated from HardwareConfig like every other section; only `gpus` gets a picker of the GPUs NVML sees.
"""

from __future__ import annotations

import gradio as gr
import yaml

from engine.runtime import distributed, telemetry
from engine.recipe.configs import HardwareConfig
from engine.training.estimate import estimate_recipe
from engine.recipe.files import RecipeError
from ui import views
from ui.forms import build_form
from ui.state import AppState, cuda_available

MAX_LISTED_GPUS = 8  # indices offered even when NVML does not see them (the recipe may be for another machine)


def build(state: AppState, recipe: dict) -> None:
    found, note = telemetry.gpus()
    gr.Markdown("**hardware**" + ("" if found else f" · {note}: training runs on CPU."), elem_id="hardware-note")
    state.add_form(build_form("hardware", HardwareConfig, recipe.get("hardware"),
                              custom={"gpus": lambda name, info, value: gpu_picker(found, name, info, value)}))
    with gr.Row():
        fit = gr.Button("Will it fit? (memory and time per GPU, disk)", size="sm", elem_id="estimate-button")
        show = gr.Button("Show the accelerate config and each machine's command", size="sm")
    fit_box = gr.HTML(elem_id="estimate")
    launch_box = gr.Code(language="shell", label="accelerate launch, per machine", visible=False, lines=6,
                         interactive=False)

    def wire() -> None:
        inputs = state.recipe_inputs()
        fit.click(lambda data: estimate_html(state, data), inputs, fit_box)
        show.click(lambda data: launch_preview(state, data), inputs, [launch_box, fit_box])

    state.after_build(wire)


def gpu_picker(found: list[dict], name: str, info: str, value) -> gr.CheckboxGroup | gr.Textbox:
    """Tick boxes named after the GPUs NVML sees (plus indices up to 8, for a recipe meant for a bigger machine);
    with no GPU here, a text field for indices instead of a row of boxes for GPUs that do not exist."""
    if not found:
        return gr.Textbox(",".join(str(v) for v in value or []), label=name, placeholder="none (CPU here)",
                          info=f"{info} · this machine has none: leave empty; for a recipe meant for a GPU machine, "
                               "list indices, e.g. 0,1", elem_id="gpu-picker")
    names = {g["index"]: g for g in found}
    choices = []
    for index in range(max(MAX_LISTED_GPUS, len(found))):
        gpu = names.get(index)
        label = (f"cuda:{index} · {gpu['name']} · {gpu.get('mem_total_gb') or 0:.0f} GiB" if gpu
                 else f"cuda:{index} (not on this machine)")
        choices.append((label, index))
    return gr.CheckboxGroup(choices=choices, value=list(value or []), label=name,
                            info=f"{info} · none ticked = GPU 0", elem_id="gpu-picker")


def estimate_html(state: AppState, data: dict) -> str:
    try:
        recipe = state.draft_recipe(data)
    except RecipeError as exc:
        return views.message(str(exc), "error")
    cuda = cuda_available()
    rows = []
    for stage in ("sft", "qat"):
        if not getattr(recipe, stage).enabled:
            continue
        try:
            rows.append((stage, estimate_recipe(recipe, stage, cuda)))
        except ValueError as exc:
            return views.message(f"No estimate: {exc}", "info")
    return "".join(_estimate_block(stage, est) for stage, est in rows) + (_disk_block(rows[0][1]) if rows else "")


def _disk_block(est: dict) -> str:
    disk = est["disk_gib"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in disk.items() if k != "total")
    return views.message(f"Disk: the run writes about {disk['total']:.1f} GiB under runs/<id>/ ({parts}); the base "
                         "model is read where it is, not copied. LoRA stages keep adapters, PTQ its quantizers.", "info")


def _estimate_block(stage: str, est: dict) -> str:
    mem, time = est["per_gpu_gib"], est["time"]
    kind = {"fits": "ok", "tight": "info"}.get(est["verdict"], "error")
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in mem.items() if k != "total" and v)
    lines = [f"{stage.upper()}: {est['method']} on {est['gpus']} GPU(s), {est['strategy']}, "
             f"{_count(est['parameters'])} parameters ({_count(est['trainable_parameters'])} trained)",
             f"{est['verdict']}: {mem['total']:.1f} GiB per GPU of {est['available_gib']:.0f} GiB "
             f"({est['available_source']}) = {parts}",
             f"about {time['step_s']:.2f} s per step, {time['tokens_per_s']:,} tokens/s at {time['mfu']:.0%} of "
             f"{time['peak_tflops']:.0f} TFLOP/s (a rough guide; docs/benchmarks.md has measured steps)"]
    lines += [f"suggestion: {s}" for s in est["suggestions"]]
    return views.message("\n".join(lines), kind)


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def launch_preview(state: AppState, data: dict):
    """The accelerate config the engine will write for the SFT job and each machine's command (the job id is known
    once the run is queued; the SFT/QAT tabs then show the exact commands)."""
    try:
        recipe = state.draft_recipe(data)
    except RecipeError as exc:
        return gr.Code(visible=False), views.message(str(exc), "error")
    hw = recipe.hardware
    if hw.strategy == "single":
        return gr.Code(visible=False), views.message(
            "strategy 'single': one process, no accelerate launch. Pick ddp, fsdp2 or deepspeed_zero3 and "
            "num_processes > 1 to train on several GPUs or machines.", "info")
    cuda = cuda_available()
    try:
        config = distributed.accelerate_config(hw, recipe.sft, on_cuda=cuda, bf16=cuda)
    except ValueError as exc:
        return gr.Code(visible=False), views.message(f"hardware: {exc}", "error")
    path = state.workdir / "runs" / "<run id>" / "accelerate" / "<job id>-sft.yaml"
    commands = distributed.node_commands(path, hw, state.workdir, job_id=0)
    text = "\n".join(f"# machine rank {rank}{' (this machine: the engine runs it)' if rank == hw.machine_rank else ''}"
                     f"\n{cmd.replace('--job 0', '--job <job id>')}" for rank, cmd in enumerate(commands))
    text += "\n\n# " + str(path) + "\n" + "\n".join(f"# {line}" for line in yaml.safe_dump(config).splitlines())
    return gr.Code(value=text, visible=True), ""
