"""The header shown above every tab: live machine telemetry (1 s) and the run selector."""

from __future__ import annotations

import html
import threading
import time

import gradio as gr

from engine.runtime import telemetry
from ui.state import AppState

_cache: dict = {"at": 0.0, "html": ""}
_cache_lock = threading.Lock()


def build(state: AppState) -> None:
    with gr.Row(elem_id="header", equal_height=True):
        gr.HTML("<div class='brand'>gpt-oss <b>QAT Studio</b></div>", elem_id="brand", scale=0, min_width=150)
        meters = gr.HTML(telemetry_html(state), elem_id="telemetry", scale=4, min_width=560)
        # allow_custom_value: a run deleted elsewhere must not make the selector raise before the choices refresh.
        state.run = gr.Dropdown(choices=[], value=None, label="Selected run", elem_id="run-select", scale=2,
                                min_width=400, allow_custom_value=True)
    timer = gr.Timer(1.0)
    timer.tick(lambda: telemetry_html(state), outputs=meters, show_progress="hidden", queue=False)


def telemetry_html(state: AppState) -> str:
    """The meters as HTML. One snapshot per ~0.9 s however many browsers poll (NVML calls are not free)."""
    with _cache_lock:
        if time.time() - _cache["at"] > 0.9:
            _cache["html"] = render(telemetry.sample(state.workdir))
            _cache["at"] = time.time()
        return _cache["html"]


def _na(value, fmt: str = "{:.0f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _meter(label: str, value: str, percent: float | None = None, title: str = "") -> str:
    bar = ""
    if percent is not None:
        color = "#d62828" if percent > 90 else "#f77f00" if percent > 75 else "#2b9348"
        bar = f"<span class='bar'><span style='width:{min(100, percent):.0f}%;background:{color}'></span></span>"
    return (f"<span class='meter' title='{html.escape(title)}'><span class='k'>{label}</span>"
            f"<span class='v'>{value}</span>{bar}</span>")


def render(sample: dict) -> str:
    parts = [
        _meter("CPU", f"{sample['cpu_percent']:.0f}% of {sample['cpu_count']}", sample["cpu_percent"]),
        _meter("RAM", f"{sample['ram_used_gb']:.1f}/{sample['ram_total_gb']:.0f} GiB",
               100 * sample["ram_used_gb"] / sample["ram_total_gb"]),
    ]
    if sample.get("disk_total_gb"):
        parts.append(_meter("Disk", f"{sample['disk_used_gb']:.0f}/{sample['disk_total_gb']:.0f} GiB",
                            100 * sample["disk_used_gb"] / sample["disk_total_gb"], "the workspace's disk"))
    for gpu in sample.get("gpus") or []:
        parts.append(_gpu_html(gpu))
    if sample.get("gpu_note"):
        parts.append(f"<span class='note'>{html.escape(sample['gpu_note'])}</span>")
    return f"<div class='meters'>{''.join(parts)}</div>"


def _gpu_html(gpu: dict) -> str:
    mem_used, mem_total = gpu.get("mem_used_gb"), gpu.get("mem_total_gb")
    mem_pct = 100 * mem_used / mem_total if mem_used is not None and mem_total else None
    procs = ", ".join(f"{p['pid']} {p['name']}" + (f" {p['mem_gb']:.1f} GiB" if p.get("mem_gb") is not None else "")
                      for p in gpu.get("processes") or []) or "no processes"
    title = f"{gpu.get('name')}: {procs}"
    label = f"GPU{gpu['index']}"
    bits = [
        _meter(label, f"{_na(gpu.get('util_percent'))}%", gpu.get("util_percent"), title),
        _meter("mem", f"{_na(mem_used, '{:.1f}')}/{_na(mem_total)} GiB", mem_pct, title),
        _meter("pwr", f"{_na(gpu.get('power_w'))}/{_na(gpu.get('power_limit_w'))} W", None, title),
        _meter("temp", f"{_na(gpu.get('temp_c'))}°C", None, title),
        _meter("SM", f"{_na(gpu.get('sm_clock_mhz'))} MHz", None, title),
        _meter("procs", str(len(gpu.get("processes") or [])), None, title),
    ]
    return f"<span class='gpu' title='{html.escape(title)}'>{''.join(bits)}</span>"
