"""Plotly figures: plain data in, figure out (no storage, no Gradio), all in the palette of ui/palette.py."""

from __future__ import annotations

import datetime as dt

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.palette import FORMAT_COLORS, base_layout, model_color, series_color

TRAIN_PANELS = [("loss", "train loss"), ("eval_loss", "eval loss"), ("learning_rate", "learning rate"),
                ("grad_norm", "grad norm"), ("tokens_per_s", "tokens / s")]


def empty(message: str, height: int = 240, title: str | None = None) -> go.Figure:
    fig = go.Figure(layout=base_layout(title, height=height))
    fig.add_annotation(text=message, showarrow=False, font={"size": 13, "color": "#6c757d"},
                       xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def series_style(key: str) -> tuple[str, str]:
    """(label, colour) of a training series keyed by job key: 'sft', 'qat:mxfp4', ..."""
    stage, _, fmt = key.partition(":")
    label = "SFT" if stage == "sft" else f"{stage.upper()} {fmt.upper()}" if fmt else stage
    return label, model_color(stage, fmt or "bf16")


def training_figure(series: dict[str, dict[str, list]], reference: dict[str, float] | None = None,
                    height: int = 470) -> go.Figure:
    """Loss (wide), then eval loss, lr, grad norm, tokens/s; one line per job. series[key][metric] = [steps, values].
    reference: horizontal dashed lines on the eval-loss panel, e.g. {"SFT level": 1.23}."""
    fig = make_subplots(rows=2, cols=3, specs=[[{"colspan": 2}, None, {}], [{}, {}, {}]],
                        subplot_titles=[title for _, title in TRAIN_PANELS], vertical_spacing=0.16,
                        horizontal_spacing=0.07)
    cells = [(1, 1), (1, 3), (2, 1), (2, 2), (2, 3)]
    for key, metrics in series.items():
        label, color = series_style(key)
        for (metric, _), (row, col) in zip(TRAIN_PANELS, cells):
            steps, values = metrics.get(metric, ([], []))
            if not steps:
                continue
            fig.add_trace(go.Scatter(x=steps, y=values, name=label, legendgroup=key, showlegend=metric == "loss",
                                     mode="lines+markers", marker={"size": 4}, line={"color": color, "width": 2}),
                          row=row, col=col)
    for label, value in (reference or {}).items():
        fig.add_hline(y=value, line={"dash": "dash", "color": model_color("sft"), "width": 1}, row=1, col=3,
                      annotation_text=label, annotation_position="top left", annotation_font_size=10)
    fig.update_layout(**base_layout(height=height, hovermode="closest"))
    fig.update_xaxes(title_text="step", title_font_size=10, row=2)
    fig.update_xaxes(**step_ticks([s for m in series.values() for steps, _ in m.values() for s in steps]))
    return fig


def step_ticks(steps: list[int]) -> dict:
    """x-axis ticks for optimizer steps: whole numbers only. Plotly's automatic ticks go to 0.5 when an axis spans
    fewer steps than it has room for ticks (a smoke run's 4 QAT steps showed 0.5, 1, 1.5, ...)."""
    span = max(steps) - min(steps) if steps else 0
    if span > 40:  # ~10 ticks at most: plotly's automatic spacing is then >= 5
        return {"tickformat": "d"}
    dtick = next(d for d in (1, 2, 5, 10) if span / d <= 8)
    return {"tick0": 0, "dtick": dtick, "tickformat": "d"}


def pass_rate_bars(rows: list[dict], tasks: list[str], height: int = 350) -> go.Figure:
    """Grouped bars: x = task (and 'overall'), one bar per evaluated model. rows: summary()['rows']."""
    title = "Pass rate per task"
    if not rows:
        return empty("no evaluations yet", height, title)
    fig = go.Figure()
    x = [*tasks, "overall"]
    for row in rows:
        m = row["metrics"]
        label = model_label(row["stage"], row["format"])
        values = [m.get(f"{t}_pass_rate") for t in tasks] + [m.get("pass_rate")]
        fig.add_trace(go.Bar(x=x, y=[None if v is None else 100 * v for v in values], name=label,
                             marker_color=model_color(row["stage"], row["format"]),
                             text=[None if v is None else f"{100 * v:.0f}" for v in values], textposition="outside"))
    fig.update_layout(**base_layout(title, height=height, barmode="group", hovermode="closest",
                                    yaxis={"title": "pass rate (%)", "range": [0, 109]}))
    return fig


def model_label(stage: str, fmt: str) -> str:
    from engine.evaluation.results import STAGE_TITLES

    title = STAGE_TITLES.get(stage, stage)
    return title if fmt == "bf16" else f"{title} {fmt.upper()}"


def telemetry_figure(rows: list[dict], height: int = 260) -> go.Figure:
    """CPU %, RAM, and per-GPU utilisation / memory over time, from stored compact samples."""
    if not rows:
        return empty("no telemetry recorded for this run (samples are stored every ~10 s while it runs)", height)
    times = [dt.datetime.fromtimestamp(r["time"]) for r in rows]
    keys = sorted({k for r in rows for k in r["sample"]})
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, key in enumerate(k for k in keys if k.endswith("_percent")):
        fig.add_trace(go.Scatter(x=times, y=[r["sample"].get(key) for r in rows], name=telemetry_name(key),
                                 mode="lines", line={"color": series_color(i)}), secondary_y=False)
    for i, key in enumerate(k for k in keys if k.endswith("_gb")):
        fig.add_trace(go.Scatter(x=times, y=[r["sample"].get(key) for r in rows], name=telemetry_name(key),
                                 mode="lines", line={"color": series_color(i + 4), "dash": "dot"}), secondary_y=True)
    fig.update_layout(**base_layout(height=height))
    fig.update_yaxes(title_text="%", range=[0, 105], secondary_y=False)
    fig.update_yaxes(title_text="GiB", secondary_y=True, showgrid=False)
    return fig


def telemetry_name(key: str) -> str:
    """A stored sample key as a legend entry: 'gpu0_mem_used_gb' -> 'GPU0 mem used (GiB)', 'cpu_percent' -> 'CPU %'."""
    words = key.removesuffix("_percent").removesuffix("_gb").split("_")
    words[0] = words[0].upper()  # cpu, ram, gpu<N>
    return " ".join(words) + (" %" if key.endswith("_percent") else " (GiB)")


def overlay_figure(curves: list[dict], x_title: str, y_title: str, height: int = 380,
                   title: str | None = None) -> go.Figure:
    """Lines from several runs/stages: curves = [{label, x, y, color, dash}]."""
    if not curves:
        return empty("pick runs with training metrics", height, title)
    fig = go.Figure()
    for c in curves:
        fig.add_trace(go.Scatter(x=c["x"], y=c["y"], name=c["label"], mode="lines",
                                 line={"color": c["color"], "dash": c.get("dash", "solid"), "width": 2}))
    fig.update_layout(**base_layout(title, height=height, xaxis={"title": x_title}, yaxis={"title": y_title}))
    return fig


def layer_error_figure(items: list[dict], height: int = 380,
                       title: str = "Per-layer weight quantization error vs SFT (hatched = QAT)",
                       y_title: str = "‖Wq − W‖ / ‖W‖",
                       empty_text: str = "no per-layer weight errors yet (PTQ/QAT evaluations record them)") -> go.Figure:
    """One value per expert tensor: x = tensor ('L0 gate_up'), one bar group per model; items = [{label,
    stage, fmt, errors: {tensor name: value}}]."""
    items = [i for i in items if i["errors"]]
    if not items:
        return empty(empty_text, height, title)
    fig = go.Figure()
    for item in items:
        names = sorted(item["errors"], key=_layer_sort_key)
        fig.add_trace(go.Bar(x=[short_tensor(n) for n in names], y=[item["errors"][n] for n in names],
                             name=item["label"], marker_color=model_color(item["stage"], item["fmt"]),
                             marker_pattern_shape="/" if item["stage"] == "qat" else ""))
    fig.update_layout(**base_layout(title, height=height, barmode="group", hovermode="closest",
                                    yaxis={"title": y_title}))
    return fig


def short_tensor(name: str) -> str:
    """'model.layers.3.mlp.experts.gate_up_proj' -> 'L3 gate_up'."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"), "?")
    return f"L{layer} {parts[-1].removesuffix('_proj')}"


def _layer_sort_key(name: str) -> tuple:
    label = short_tensor(name)
    layer = label.split()[0][1:]
    return (int(layer) if layer.isdigit() else 0, label)


def length_histogram(lengths: list[int], max_length: int | None, height: int = 280,
                     title: str = "Token lengths") -> go.Figure:
    if not lengths:
        return empty("no rows to measure", height, title)
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=40, marker_color=FORMAT_COLORS["bf16"]))
    if max_length:
        fig.add_vline(x=max_length, line={"dash": "dash", "color": "#d62828"},
                      annotation_text=f"max_length {max_length}", annotation_font_size=10)
    fig.update_layout(**base_layout(title, height=height, hovermode="closest", bargap=0.05,
                                    xaxis={"title": "tokens per example"}, yaxis={"title": "examples"}))
    return fig
