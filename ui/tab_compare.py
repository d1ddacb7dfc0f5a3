"""Compare tab: several runs (or the formats within one) side by side: overlaid loss curves (SFT, then QAT, by step
or by tokens), eval metrics with deltas highlighted, each run's PTQ-vs-QAT story in one line per format, and per layer
the weight quantization error and how much of the fine-tune quantization erased."""

from __future__ import annotations

from html import escape as esc

import gradio as gr

from engine.evaluation.results import STAGE_ORDER, story_lines, summary
from ui import charts
from ui.palette import model_color
from ui.state import AppState

DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
# (metric, label, higher is better)
COLUMNS = [("pass_rate", "pass %", True), ("eval_loss", "eval loss", False), ("perplexity", "perplexity", False),
           ("weight_rel_error", "weight rel. err", False),
           ("finetune_erased_share", "fine-tune erased %", False)]


def build(state: AppState) -> None:
    with gr.Row(equal_height=True):
        runs = gr.Dropdown([], value=[], multiselect=True, label="Runs to compare (the first is the baseline)",
                           scale=4, elem_id="compare-runs")
        x_axis = gr.Radio(["step", "tokens"], value="step", label="Align curves by", scale=1)
        metric = gr.Radio(["loss", "eval_loss"], value="loss", label="Curve", scale=1)
    curves = gr.Plot(show_label=False, elem_id="compare-curves")
    table = gr.HTML(elem_id="compare-table")
    with gr.Row(equal_height=True):
        layers = gr.Plot(show_label=False, elem_id="compare-layers")
        survival = gr.Plot(show_label=False, elem_id="compare-survival")

    gr.on(state.shown("compare", every=30.0), lambda run_id, chosen: _with_selected(state, run_id, chosen),
          [state.run, runs], runs, show_progress="hidden")
    gr.on([runs.change, x_axis.change, metric.change], lambda r, x, m: draw(state, r, x, m), [runs, x_axis, metric],
          [curves, table, layers, survival], show_progress="hidden")


def _with_selected(state: AppState, run_id: str | None, chosen: list[str] | None):
    """Keep the header's run in the comparison (as the newest entry) without dropping the user's picks."""
    chosen = list(chosen or [])
    if run_id and run_id not in chosen:
        chosen.append(run_id)
    return gr.Dropdown(choices=state.run_choices(), value=chosen)


def draw(state: AppState, run_ids: list[str] | None, x_axis: str, metric: str):
    run_ids = [r for r in (run_ids or []) if state.store().get_run(r)]
    return (loss_curves(state, run_ids, x_axis, metric), metrics_table(state, run_ids), layer_errors(state, run_ids),
            layer_survival(state, run_ids))


def loss_curves(state: AppState, run_ids: list[str], x_axis: str, metric: str):
    store = state.store()
    out = []
    for n, run_id in enumerate(run_ids):
        jobs = {j["id"]: j for j in store.list_jobs(run_id) if j["stage"] in ("sft", "qat")}
        rows = store.metrics(run_id=run_id, names=[metric, "tokens_per_s"])
        series = _per_job(rows, jobs)
        sft_end = series.get("sft", {}).get("end", (0, 0.0))
        for key, s in sorted(series.items(), key=lambda kv: kv[0] != "sft"):
            offset = (0, 0.0) if key == "sft" else sft_end  # QAT continues where SFT stopped
            xs = [p + offset[0] for p in s["steps"]] if x_axis == "step" else [t + offset[1] for t in s["tokens"]]
            stage, _, fmt = key.partition(":")
            out.append({"label": f"{run_id[-9:]} {charts.series_style(key)[0]}", "x": xs, "y": s["values"],
                        "color": model_color(stage, fmt or "bf16"), "dash": DASHES[n % len(DASHES)]})
    title = ("optimizer step (QAT offset by the SFT steps)" if x_axis == "step"
             else "training tokens (≈ Σ tokens/s × Δt)")
    return charts.overlay_figure(out, title, metric.replace("_", " "),
                                 title="Training curves: SFT, then QAT continuing from it")


def _per_job(rows: list[dict], jobs: dict[int, dict]) -> dict[str, dict]:
    """Per job key: steps, values, cumulative tokens at each point (integrated from tokens/s), and the end point."""
    out: dict[str, dict] = {}
    for job_id, job in jobs.items():
        mine = [r for r in rows if r["job_id"] == job_id and r["value"] is not None]
        values = [r for r in mine if r["name"] != "tokens_per_s"]
        if not values:
            continue
        rates = sorted((r["time"], r["value"]) for r in mine if r["name"] == "tokens_per_s")
        tokens, total, last_time = {}, 0.0, job.get("started_at") or (rates[0][0] if rates else 0)
        for when, rate in rates:
            total += rate * max(0.0, when - last_time)
            last_time = when
            tokens[when] = total
        cumulative = [max((t for w, t in tokens.items() if w <= r["time"]), default=0.0) for r in values]
        out[job["config"]["key"]] = {"steps": [r["step"] for r in values], "values": [r["value"] for r in values],
                                     "tokens": cumulative, "end": (values[-1]["step"], total)}
    return out


def _models(store, run_id: str) -> dict[tuple, dict]:
    from engine.evaluation.results import summary

    return {(r["stage"], r["format"]): r["metrics"] for r in summary(store, run_id)["rows"]}


def metrics_table(state: AppState, run_ids: list[str]) -> str:
    """One row per (model, run); each value with its delta vs the baseline: the first run's same model, or with a
    single run, that run's SFT model (so formats are compared against what they quantize)."""
    if not run_ids:
        return "<div class='note'>Pick one or more runs.</div>"
    store = state.store()
    per_run = {r: _models(store, r) for r in run_ids}
    keys = sorted({k for models in per_run.values() for k in models}, key=lambda k: (STAGE_ORDER.get(k[0], 9), k[1]))
    head = "".join(f"<th>{label}</th>" for _, label, _ in COLUMNS)
    body = []
    for key in keys:
        for run_id in run_ids:
            metrics = per_run[run_id].get(key)
            if metrics is None:
                continue
            base = per_run[run_ids[0]].get(key) if len(run_ids) > 1 else per_run[run_id].get(("sft", "bf16"))
            is_base = base is metrics
            cells = "".join(f"<td>{_cell(metrics.get(m), None if is_base or not base else base.get(m), up)}</td>"
                            for m, _, up in COLUMNS)
            label = charts.model_label(*key)
            body.append(f"<tr><td><span class='dot' style='background:{model_color(*key)}'></span>{label}</td>"
                        f"<td><code>{run_id}</code></td>{cells}</tr>")
    stories = [f"<li><code>{run_id}</code> {esc(line)}</li>" for run_id in run_ids
               for line in story_lines(summary(store, run_id))]
    story = f"<ul class='story'>{''.join(stories)}</ul>" if stories else ""
    return (f"{story}<table class='compare'><tr><th>model</th><th>run</th>{head}</tr>{''.join(body)}</table>"
            "<div class='note'>Δ vs the baseline: green = better, red = worse.</div>")


def _cell(value, base, higher_better: bool) -> str:
    if value is None:
        return "-"
    pct = 100 if isinstance(value, float) and value <= 1 and higher_better else 1
    shown = f"{value * pct:.1f}" if pct == 100 else f"{value:.4f}"
    if base is None:
        return shown
    delta = value - base
    if abs(delta) < 1e-12:
        return f"{shown} <span class='delta'>(±0)</span>"
    better = (delta > 0) == higher_better
    digits = 1 if pct == 100 else 4
    return f"{shown} <span class='delta {'up' if better else 'down'}'>({delta * pct:+.{digits}f})</span>"


def _per_tensor_items(state: AppState, run_ids: list[str], metric: str, value=lambda v: v) -> list[dict]:
    """One bar group per quantized model of the runs: {label, stage, fmt, errors: {tensor: value(metric's entry)}}."""
    store = state.store()
    items = []
    for run_id in run_ids:
        for ev in store.evals(run_id):
            per_tensor = ev["metrics"].get(metric)
            if ev["stage"] in ("ptq", "qat") and per_tensor:
                label = charts.model_label(ev["stage"], ev["fmt"])
                items.append({"label": f"{run_id[-9:]} {label}" if len(run_ids) > 1 else label,
                              "stage": ev["stage"], "fmt": ev["fmt"],
                              "errors": {name: value(v) for name, v in per_tensor.items()}})
    return items


def layer_survival(state: AppState, run_ids: list[str]):
    """Per layer and format: the share of the expert weights SFT changed that are served at the base's value."""
    items = _per_tensor_items(state, run_ids, "per_tensor_finetune_survival", lambda v: v["erased_share"])
    return charts.layer_error_figure(
        items, title="Fine-tune erased by quantization, per layer (share of SFT-changed expert weights served at "
        "the base's value; hatched = QAT)", y_title="erased share", empty_text="no fine-tune survival yet (PTQ/QAT "
        "evaluations after SFT record it)")


def layer_errors(state: AppState, run_ids: list[str]):
    return charts.layer_error_figure(_per_tensor_items(state, run_ids, "per_tensor_weight_rel_error"))

