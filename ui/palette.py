"""One palette for every chart and card, so a stage or format has the same colour everywhere.

Formats own a hue (MXFP4 orange, NVFP4 NVIDIA green, NVFP4 W4A4 purple); PTQ is the light shade of it and QAT the
dark one, so "same format" reads as "same colour family" and "QAT" as "the stronger line".
"""

from __future__ import annotations

STAGE_COLORS = {"original": "#8d99ae", "sft": "#3a86ff", "ptq": "#f4a261", "qat": "#2a9d8f"}
FORMAT_COLORS = {"bf16": "#3a86ff", "mxfp4": "#f3722c", "nvfp4": "#76b900", "nvfp4_w4a4": "#8338ec"}
_SHADES = {  # (PTQ, QAT) per format
    "mxfp4": ("#f8b27f", "#d9480f"),
    "nvfp4": ("#b5d96b", "#4c7a00"),
    "nvfp4_w4a4": ("#c3a1f5", "#5a189a"),
}
STATUS_COLORS = {
    "queued": "#adb5bd", "running": "#3a86ff", "cancelling": "#ffb703", "succeeded": "#2b9348",
    "failed": "#d62828", "cancelled": "#f77f00", "interrupted": "#f77f00", "skipped": "#ced4da", "none": "#e9ecef",
}
SEQUENCE = ["#3a86ff", "#f3722c", "#76b900", "#8338ec", "#e5383b", "#00b4d8", "#ffb703", "#6c757d"]
FONT = "Inter, 'Segoe UI', Helvetica, Arial, sans-serif"


def model_color(stage: str, fmt: str = "bf16") -> str:
    """Colour of one evaluated model: original, SFT, or PTQ/QAT in a format."""
    if stage in ("ptq", "qat") and fmt in _SHADES:
        return _SHADES[fmt][0 if stage == "ptq" else 1]
    return STAGE_COLORS.get(stage, FORMAT_COLORS.get(fmt, SEQUENCE[-1]))


def series_color(index: int) -> str:
    """For series that are neither stages nor formats (e.g. runs in the compare view)."""
    return SEQUENCE[index % len(SEQUENCE)]


def base_layout(title: str | None = None, height: int = 300, **extra) -> dict:
    """The look every plotly figure shares: white, compact margins, legend on top."""
    layout = {
        "template": "plotly_white",
        "height": height,
        "margin": {"l": 50, "r": 20, "t": 78 if title else 30, "b": 40},
        "font": {"family": FONT, "size": 12},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "font": {"size": 11}},
        "hovermode": "x unified",
    }
    if title:
        layout["title"] = {"text": title, "font": {"size": 14}, "x": 0.01, "y": 0.98, "yanchor": "top"}
    layout.update(extra)
    return layout
