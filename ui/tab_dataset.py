"""Dataset tab: choose the training data (embedded, an uploaded JSONL/Parquet, or a Hugging Face id), validate it
with engine.data.chat_data, see one row exactly as the model sees it (harmony text with special tokens, the tokens that
carry the loss highlighted), the token-length histogram, and the train/eval split settings of the recipe draft."""

from __future__ import annotations

import functools
import html
import os
import random
import re
import shutil
import threading
from pathlib import Path

import gradio as gr

from engine.recipe.configs import DataConfig
from engine.data.chat_data import EMBEDDED, DataError, dataset_stats, load_chat_dataset, split_train_eval
from engine.runtime.workspace import ASSETS
from ui import charts, views
from ui.forms import build_form
from ui.state import AppState

HIST_SAMPLE = 2000  # rows tokenized for the histogram (the whole demo set takes ~6 s on a small CPU)
LOSS, SPECIAL = "trained (loss)", "special token"


def build(state: AppState) -> None:
    gr.Markdown("Training data in the `messages` chat format. Pick an embedded set, upload a `.jsonl` / "
                "`.parquet` file, or type a Hugging Face dataset id. The split settings feed the recipe draft.")
    choices = source_choices(state.workdir)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            form = state.add_form(build_form("data", DataConfig, state.base.value.get("data"),
                                             custom={"source": functools.partial(_source_box, choices)}))
        with gr.Column(scale=1, min_width=240):
            upload = gr.File(label="Upload JSONL / Parquet", file_types=[".jsonl", ".parquet"], height=120)
            check = gr.Button("Validate dataset", variant="primary", elem_id="validate-data")
    report = gr.HTML(elem_id="data-report")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                row_index = gr.Number(value=0, precision=0, label="Row", scale=1, min_width=100)
                pick = gr.Button("Random row", size="sm", scale=0, min_width=120)
            tokens = gr.HighlightedText(label="What the model sees (embedded tokenizer's chat template, harmony "
                                        "format); highlighted tokens carry the loss", combine_adjacent=True,
                                        show_legend=True, color_map={LOSS: "#2b9348", SPECIAL: "#adb5bd"},
                                        elem_id="token-preview")
        with gr.Column(scale=2):
            histogram = gr.Plot(show_label=False, elem_id="length-histogram")

    source = form.components["source"]
    split_inputs = [source, form.components["eval_fraction"], form.components["split_seed"]]
    preview_inputs = [source, row_index, form.components["max_length"]]
    check.click(validate, split_inputs, report).then(preview, preview_inputs, [tokens, histogram])
    source.change(validate, split_inputs, report)  # the report is quick; the token preview waits for a click
    upload.upload(lambda f: save_upload(state.workdir, f), upload, [source, report])
    row_index.submit(preview, preview_inputs, [tokens, histogram])
    pick.click(random_row, source, row_index).then(preview, preview_inputs, [tokens, histogram])


def _source_box(choices: list[str], name: str, info: str, value: str) -> gr.Dropdown:
    return gr.Dropdown(choices, value=value, label=name, info=info, allow_custom_value=True, elem_id="data-source")


def source_choices(workdir: Path) -> list[str]:
    uploads = sorted(str(p) for p in (workdir / "uploads").glob("*") if p.suffix in (".jsonl", ".parquet"))
    return [*EMBEDDED, *uploads]


def sanitize_filename(name: str) -> str:
    """Keep letters, digits, '.', '-', '_'; no leading dots or path parts; 100 characters at most."""
    base = os.path.basename(name.replace("\\", "/"))
    stem, ext = os.path.splitext(base)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "dataset"
    return f"{stem[:100]}{ext.lower()}"


def save_upload(workdir: Path, temp_path: str | None):
    """Copy an upload into <workspace>/uploads/ under a safe, unique name, and select it as the source."""
    if not temp_path:
        return gr.skip(), ""
    name = sanitize_filename(temp_path)
    if not name.endswith((".jsonl", ".parquet")):
        return gr.skip(), views.message(f"{name}: upload a .jsonl or .parquet file", "error")
    folder = workdir / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / name, 2
    while target.exists():
        target = folder / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    shutil.copyfile(temp_path, target)
    update = gr.Dropdown(choices=source_choices(workdir), value=str(target))
    return update, views.message(f"Saved as {target}; click Validate dataset.", "ok")


_rows_cache: dict = {}
_rows_lock = threading.Lock()


def load_rows(source: str) -> list[dict]:
    """engine.data.chat_data's loader (raises DataError), cached per source and file modification time."""
    path = Path(source)
    key = (source, path.stat().st_mtime if path.is_file() else None)
    with _rows_lock:
        if key not in _rows_cache:
            _rows_cache.clear()  # keep one dataset in memory, not every one ever looked at
            _rows_cache[key] = load_chat_dataset(source, root=ASSETS)
        return _rows_cache[key]


def validate(source: str, eval_fraction: float, seed: int) -> str:
    try:
        rows = load_rows(source)
    except DataError as exc:
        items = "".join(f"<li><code>{html.escape(str(i))}</code></li>" for i in exc.issues[:50])
        more = f"<li>… and {len(exc.issues) - 50} more</li>" if len(exc.issues) > 50 else ""
        return (f"<div class='report bad'><b>✗ {html.escape(source)}: {len(exc.issues)} problem(s)</b>"
                f"<ul>{items}{more}</ul></div>")
    stats = dataset_stats(rows)
    try:
        train, held = split_train_eval(rows, float(eval_fraction), int(seed))
        split = f"{len(train)} train / {len(held)} eval (eval_fraction {eval_fraction}, seed {seed})"
    except (TypeError, ValueError) as exc:
        split = f"split settings invalid: {exc}"
    return report_html(source, stats, split)


def report_html(source: str, stats: dict, split: str) -> str:
    roles = "".join(f"<td>{html.escape(str(r))}</td><td><b>{n}</b></td>" for r, n in stats["roles"].items())
    tasks = ", ".join(f"{html.escape(str(t))} {n}" for t, n in stats["tasks"].items())
    return (f"<div class='report ok'><b>✓ {html.escape(source)}: {stats['rows']} rows, no problems</b>"
            f"<table class='kv'><tr><td>split</td><td colspan=7>{html.escape(split)}</td></tr>"
            f"<tr><td>tasks</td><td colspan=7>{tasks}</td></tr>"
            f"<tr><td>messages per role</td>{roles}</tr>"
            f"<tr><td>with thinking</td><td colspan=7>{stats['with_thinking']}</td></tr></table></div>")


def random_row(source: str) -> int:
    try:
        return random.randrange(len(load_rows(source)))
    except (DataError, ValueError):
        return 0


def tokenizer():
    """The embedded tokenizer, imported on first use: transformers pulls in torch (seconds), so the app loads it in
    the background after it starts serving (ui.state.warm_up_in_background)."""
    from engine.data.embedded_model import embedded_tokenizer

    return embedded_tokenizer()


def preview(source: str, index, max_length):
    try:
        rows = load_rows(source)
    except DataError:
        return [], charts.empty("fix the dataset problems above first")
    index = min(max(int(index or 0), 0), len(rows) - 1)
    return highlighted(rows[index]["messages"]), histogram(rows, max_length)


def highlighted(messages: list[dict]) -> list[tuple[str, str | None]]:
    """(token text, label) pairs: LOSS for the assistant tokens the loss is computed on, SPECIAL for the other
    harmony special tokens, None for the rest (the prompt)."""
    tok = tokenizer()
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    special = set(tok.all_special_ids) | {i for t, i in tok.get_vocab().items() if t.startswith("<|")}
    out = []
    for token_id, trained in zip(enc["input_ids"], enc["assistant_masks"]):
        label = LOSS if trained else SPECIAL if token_id in special else None
        out.append((tok.decode([token_id]), label))
    return out


def _lengths(rows: list[dict]) -> list[int]:
    """Token lengths of a fixed sample (engine.data.chat_data remembers them per content, so an edited file is recounted)."""
    sample = rows if len(rows) <= HIST_SAMPLE else random.Random(0).sample(rows, HIST_SAMPLE)
    return dataset_stats(sample, tokenizer())["token_lengths"]


def histogram(rows: list[dict], max_length):
    lengths = _lengths(rows)
    sampled = f" ({HIST_SAMPLE} of {len(rows)} rows, random sample)" if len(rows) > HIST_SAMPLE else ""
    return charts.length_histogram(lengths, int(max_length) if max_length else None, title=f"Token lengths{sampled}")
