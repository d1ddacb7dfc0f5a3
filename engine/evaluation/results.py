"""The results table: one row per evaluated stage, for the CLI, summary.json and the UI."""

from __future__ import annotations

import math

from storage import Store

STAGE_ORDER = {"original": 0, "sft": 1, "ptq": 2, "qat": 3}
STAGE_TITLES = {"original": "original", "sft": "SFT", "ptq": "SFT+PTQ", "qat": "SFT+QAT"}


def summary(store: Store, run_id: str) -> dict:
    """{"run_id", "rows": [{"stage", "format", "metrics"}], "exports": {fmt: dir}} (the documented format)."""
    rows = []
    formats = (store.get_run(run_id) or {}).get("recipe", {}).get("ptq", {}).get("formats", [])
    for ev in sorted(store.evals(run_id), key=lambda e: _order(e, formats)):
        metrics = {k: v for k, v in ev["metrics"].items() if not k.startswith("per_tensor") and _number(v)}
        if "eval_loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        rows.append({"stage": ev["stage"], "format": ev["fmt"], "metrics": metrics})
    exports = {a["meta"].get("format"): a["path"] for a in store.artifacts(run_id, kind="export") if a.get("meta")}
    return {"run_id": run_id, "rows": rows, "exports": exports}


def _order(ev: dict, formats: list[str]) -> tuple:
    fmt_rank = formats.index(ev["fmt"]) if ev["fmt"] in formats else -1
    stage_rank = STAGE_ORDER.get(ev["stage"], 9)
    return (stage_rank > 1, fmt_rank, stage_rank)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def task_names(data: dict) -> list[str]:
    names = {k.removesuffix("_pass_rate") for r in data["rows"] for k in r["metrics"] if k.endswith("_pass_rate")}
    names.discard("pass")
    return sorted(names)


def table_rows(data: dict) -> list[dict]:
    """Flat rows for display: model, one column per task, overall pass rate (+-95% CI), eval loss, weight error."""
    tasks = task_names(data)
    out = []
    for row in data["rows"]:
        m = row["metrics"]
        title = STAGE_TITLES.get(row["stage"], row["stage"])
        label = title if row["format"] == "bf16" else f"{title} ({row['format'].upper()})"
        item = {"model": label}
        for task in tasks:
            item[f"{task} pass %"] = _pct(m.get(f"{task}_pass_rate"))
        item["pass %"] = _pct(m.get("pass_rate"))
        if "pass_rate_ci95" in m:
            item["pass %"] += f" ±{100 * m['pass_rate_ci95']:.1f}"
        item["eval loss"] = f"{m['eval_loss']:.4f}" if "eval_loss" in m else "-"
        item["weight rel. err"] = f"{m['weight_rel_error']:.4f}" if "weight_rel_error" in m else "-"
        if any("finetune_erased_share" in r["metrics"] for r in data["rows"]):
            item["fine-tune erased %"] = _pct(m.get("finetune_erased_share"))
        out.append(item)
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(data: dict) -> str:
    rows = table_rows(data)
    if not rows:
        return "(no evaluations yet)"
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)) for r in rows]
    return "\n".join([line, rule, *body])
