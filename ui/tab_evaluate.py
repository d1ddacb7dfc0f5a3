"""Evaluate tab: the selected run's results table with deployment efficiency (checkpoint size on disk, expert weight
memory) and perplexity, pass rate per task per stage as grouped bars, and a per-example browser that puts each
stage's answer side by side (filter by task, or by 'changed between PTQ and QAT')."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from engine.evaluation.results import story_lines, summary, table_rows, task_names
from ui import charts, run_data, views
from ui.state import AppState

# Bits per expert weight: 4-bit E2M1 values plus one 8-bit scale per block (E8M0 for MXFP4, E4M3 for NVFP4).
DEFAULT_BLOCK = {"mxfp4": 32, "nvfp4": 32, "nvfp4_w4a4": 16}
ALL = "all tasks"


def build(state: AppState) -> None:
    story = gr.Markdown(elem_id="eval-story")
    results = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="eval-results")
    results_note = gr.HTML(elem_id="eval-results-note")
    bars = gr.Plot(show_label=False, elem_id="pass-rate-bars")
    gr.Markdown("### Examples\nEach evaluated model's answer to the same prompt. Click a row for the full texts.")
    with gr.Row(equal_height=True):
        task = gr.Dropdown([ALL], value=ALL, label="Task", scale=1)
        fmt = gr.Dropdown([], value=None, label="Format (for the PTQ vs QAT filter)", scale=1)
        changed = gr.Checkbox(label="only examples whose pass/fail changed between PTQ and QAT", scale=2)
    examples = gr.Dataframe(interactive=False, wrap=True, max_height=420, elem_id="eval-examples")
    detail = gr.HTML(elem_id="example-detail")
    cache = gr.State({})

    top = [story, results, results_note, bars, task, fmt, cache]
    gr.on(state.shown("evaluate", every=3.0), lambda run_id, c: refresh(state, run_id, c), [state.run, cache], top,
          show_progress="hidden")
    filters = [state.run, task, fmt, changed]
    gr.on([task.change, fmt.change, changed.change, cache.change],
          lambda *a: example_table(state, *a), filters, examples, show_progress="hidden")

    def on_select(run_id, task_name, fmt_name, only_changed, evt: gr.SelectData):
        return example_detail(state, run_id, task_name, fmt_name, only_changed, evt)

    examples.select(on_select, filters, detail)


def refresh(state: AppState, run_id: str | None, cache: dict):
    """Redraw when the run's evaluations or exports changed (they arrive a few times per run, not per tick)."""
    store = state.store()
    evals = store.evals(run_id) if run_id else []
    exports = store.artifacts(run_id, kind="export") if run_id else []
    signature = [run_id, [(e["stage"], e["fmt"], e["created_at"]) for e in evals], len(exports)]
    if cache.get("signature") == signature:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), cache
    cache = {"signature": signature}
    if not run_id:
        return ("", pd.DataFrame(), "", charts.empty("no run selected"), gr.Dropdown([ALL], value=ALL),
                gr.Dropdown([]), cache)
    data = summary(store, run_id)
    tasks = task_names(data)
    by_stage = {stage: {e["fmt"] for e in evals if e["stage"] == stage} for stage in ("ptq", "qat")}
    formats = sorted(by_stage["ptq"] & by_stage["qat"])  # formats with both: the PTQ vs QAT filter needs both
    note = views.message(run_data.short_training_note(store.get_run(run_id)), "info")
    return ("\n\n".join(f"**{line}**" for line in story_lines(data)),
            results_frame(store, run_id, data), note, charts.pass_rate_bars(data["rows"], tasks),
            gr.Dropdown([ALL, *tasks], value=ALL), gr.Dropdown(formats, value=formats[0] if formats else None), cache)


def results_frame(store, run_id: str, data: dict) -> pd.DataFrame:
    """engine.evaluation.results's table plus perplexity next to eval loss and the deployment-efficiency columns."""
    run = store.get_run(run_id)
    rows = table_rows(data)
    experts = run_data.expert_param_count(run_data.model_dir_for(run, "sft")) or \
        run_data.expert_param_count(run_data.model_dir_for(run, "original"))
    exports = {(a["meta"] or {}).get("format"): a for a in store.artifacts(run_id, kind="export")}
    block = (run["recipe"].get("ptq") or {}).get("block_size")
    out = []
    for shown, row in zip(rows, data["rows"]):
        m, stage, fmt = row["metrics"], row["stage"], row["format"]
        item = dict(shown)
        loss_at = list(item).index("eval loss") + 1
        ppl = f"{m['perplexity']:.2f}" if "perplexity" in m else "-"
        item = dict([*list(item.items())[:loss_at], ("perplexity", ppl), *list(item.items())[loss_at:]])
        item["checkpoint on disk"] = _checkpoint_size(run, stage, fmt, exports)
        item["expert weights"] = _expert_memory(experts, fmt, block)
        out.append(item)
    return pd.DataFrame(out)


def bits_per_weight(fmt: str, block_size: int | None = None) -> float:
    if fmt not in DEFAULT_BLOCK:
        return 16.0  # BF16
    return 4 + 8 / (block_size or DEFAULT_BLOCK[fmt])


def _expert_memory(count: int | None, fmt: str, block: int | None) -> str:
    if not count:
        return "-"
    bits = bits_per_weight(fmt, block)
    label = "BF16" if fmt == "bf16" else f"{fmt.upper()} {bits:g} bit"
    return f"{run_data.fmt_bytes(count * bits / 8)} ({label})"


def _checkpoint_size(run: dict, stage: str, fmt: str, exports: dict) -> str:
    """Original / SFT: the model directory (BF16 or FP32 as saved); QAT: the real FP4 export of that format."""
    if stage == "qat" and fmt in exports:
        return f"{run_data.fmt_bytes(exports[fmt].get('bytes'))} (FP4 export)"
    if stage in ("original", "sft"):
        folder = run_data.model_dir_for(run, stage)
        size = run_data.dir_bytes(folder)
        if size and (folder / "stage.json").exists():  # engine/training/stage_outputs.py: adapters, no model copy
            return f"{run_data.fmt_bytes(size)} (LoRA adapters over the base)"
        return f"{run_data.fmt_bytes(size)} ({_dtype(folder)})" if size else "-"
    return "- (fake-quant; see its QAT export)" if stage == "ptq" else "-"


def _dtype(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "model dir"
    return str(config.get("dtype") or config.get("torch_dtype") or "model dir").upper().replace("FLOAT", "FP")


def _examples(store, run_id: str) -> dict[tuple, dict]:
    """{(task, idx): {model label: example row}} over every evaluated model of the run."""
    table: dict[tuple, dict] = {}
    order = {"original": 0, "sft": 1, "ptq": 2, "qat": 3}  # columns in pipeline order, not alphabetical
    for ex in sorted(store.eval_examples(run_id), key=lambda e: (order.get(e["stage"], 9), e["fmt"])):
        label = charts.model_label(ex["stage"], ex["fmt"])
        table.setdefault((ex["task"], ex["idx"]), {})[label] = ex
    return table


def _filtered(state: AppState, run_id, task, fmt, changed) -> list[tuple[tuple, dict]]:
    if not run_id:
        return []
    items = sorted(_examples(state.store(), run_id).items())
    if task and task != ALL:
        items = [(k, v) for k, v in items if k[0] == task]
    if changed and fmt:
        ptq, qat = charts.model_label("ptq", fmt), charts.model_label("qat", fmt)
        items = [(k, v) for k, v in items if ptq in v and qat in v and v[ptq]["passed"] != v[qat]["passed"]]
    return items


def _answer(ex: dict) -> str:
    final = (ex.get("detail") or {}).get("final") or "(no final answer)"
    return f"{'✓' if ex.get('passed') else '✗'} {final[:36]}"


def example_table(state: AppState, run_id, task, fmt, changed) -> pd.DataFrame:
    rows = []
    for (task_name, idx), models in _filtered(state, run_id, task, fmt, changed)[:500]:
        first = next(iter(models.values()))
        question = first["prompt"].rsplit("[user] ", 1)[-1]  # the last user turn: the rest is the same every row
        row = {"task": task_name, "#": idx, "question": question[:70], "reference": first["reference"][:30]}
        row.update({label: _answer(ex) for label, ex in models.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def example_detail(state: AppState, run_id, task, fmt, changed, evt: gr.SelectData) -> str:
    items = _filtered(state, run_id, task, fmt, changed)
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if row is None or row >= len(items):
        return ""
    (task_name, idx), models = items[row]
    first = next(iter(models.values()))
    cells = "".join(
        f"<div class='answer {'pass' if ex['passed'] else 'fail'}'><b>{views.esc(label)}</b> "
        f"{'✓' if ex['passed'] else '✗'}<pre>{views.esc(ex.get('completion'))}</pre></div>"
        for label, ex in models.items())
    return (f"<div class='example'><div><b>{views.esc(task_name)} #{idx}</b> · reference: "
            f"<code>{views.esc(first['reference'])}</code></div><pre class='prompt'>{views.esc(first['prompt'])}</pre>"
            f"<div class='answers'>{cells}</div></div>")

