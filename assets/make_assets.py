"""Regenerate the embedded assets deterministically: the demo datasets and the tiny model's tokenizer.

    .venv/bin/python assets/make_assets.py

The pre-training corpus is not written: it is regenerated at run time from engine.data.demo_tasks.pretrain_rows
(deterministic), which keeps the committed assets small.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import demo_tasks, embedded_model  # noqa: E402

TOKENIZER_CORPUS_ROWS = 6000  # pre-training rows mixed into the tokenizer's training text


def row_texts(rows: list[dict]) -> list[str]:
    """Every string the model will see inside messages (the harmony markup is added as special tokens)."""
    return [text for row in rows for m in row["messages"] for text in (m["content"], m.get("thinking")) if text]


def make_datasets(directory: Path = demo_tasks.DATASETS_DIR) -> dict[str, list[dict]]:
    directory.mkdir(parents=True, exist_ok=True)
    datasets = {task: demo_tasks.task_rows(task) for task in demo_tasks.SFT_TASKS}
    for task, rows in datasets.items():
        (directory / f"{task}.jsonl").write_text(demo_tasks.to_jsonl(rows), encoding="utf-8")
    return datasets


def make_tokenizer(datasets: dict[str, list[dict]], directory: Path = embedded_model.TOKENIZER_DIR) -> None:
    texts = row_texts(demo_tasks.pretrain_rows(TOKENIZER_CORPUS_ROWS, seed=0))
    for rows in datasets.values():
        texts += row_texts(rows)
    embedded_model.save_tokenizer(embedded_model.train_tokenizer(texts), directory)


def main() -> None:
    started = time.perf_counter()
    datasets = make_datasets()
    print(f"datasets written in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    make_tokenizer(datasets)
    print(f"tokenizer trained in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
