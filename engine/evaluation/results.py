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
    story = story_lines(data)
    return "\n".join([line, rule, *body, *([""] + story if story else [])])


def story_lines(data: dict) -> list[str]:
    """One line per format that has SFT, PTQ and QAT evaluated: what PTQ cost and how much of it QAT won back.

    A difference of pass rates carries both rates' 95% intervals (half widths added in quadrature, a normal
    approximation): a PTQ loss inside that interval is reported as no measurable loss, and no recovery share is
    claimed for it, since a share of noise means nothing."""
    rows = {(r["stage"], r["format"]): r["metrics"] for r in data["rows"]}
    sft = rows.get(("sft", "bf16"))
    if not sft or "pass_rate" not in sft:
        return []
    lines = []
    formats = [fmt for (stage, fmt) in rows if stage == "ptq"]
    for fmt in formats:
        ptq, qat = rows.get(("ptq", fmt), {}), rows.get(("qat", fmt), {})
        if "pass_rate" not in ptq:
            continue
        lost, lost_ci = _difference(sft, ptq)
        name = fmt.upper()
        if lost <= lost_ci:
            line = (f"{name}: PTQ lost no measurable pass rate ({100 * lost:+.1f} ± {100 * lost_ci:.1f} points "
                    f"vs SFT)")
            if "pass_rate" in qat:
                gained, gained_ci = _difference(qat, ptq)
                line += f"; QAT {100 * gained:+.1f} ± {100 * gained_ci:.1f} points vs PTQ"
        else:
            line = f"{name}: PTQ lost {100 * lost:.1f} ± {100 * lost_ci:.1f} points of pass rate"
            if "pass_rate" in qat:
                recovered = (qat["pass_rate"] - ptq["pass_rate"]) / lost
                line += f"; QAT recovered {100 * recovered:.0f}% of it ({100 * qat['pass_rate']:.1f}% vs SFT's " \
                        f"{100 * sft['pass_rate']:.1f}%)"
        lines.append(line + ".")
    return lines


def _difference(a: dict, b: dict) -> tuple[float, float]:
    """a's pass rate minus b's, and the 95% half width of that difference."""
    ci = (a.get("pass_rate_ci95", 0.0) ** 2 + b.get("pass_rate_ci95", 0.0) ** 2) ** 0.5
    return a["pass_rate"] - b["pass_rate"], ci
