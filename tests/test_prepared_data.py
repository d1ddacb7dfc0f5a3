"""TRL's dataset preparation runs once per process for the same rows, tokenizer and arguments (SFT, then each QAT
format, over the same 10,800 demo rows), and its result is exactly what a fresh preparation gives."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from engine.data.chat_data import load_chat_dataset  # noqa: E402
from engine.data.embedded_model import VOCAB_SIZE, embedded_tokenizer, tiny_config  # noqa: E402
from engine.training import hf_trainer, prepared_data  # noqa: E402

ROWS = load_chat_dataset("embedded:demo")[:40]


def build(tmp_path, trainer_base=None, rows=ROWS, max_length=256, **args):
    from transformers import GptOssForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], assistant_only_loss=True,
                       max_length=max_length, packing=False, disable_tqdm=True, **args)
    cls = hf_trainer.atomic_trainer(SFTTrainer) if trainer_base is None else trainer_base
    return cls(model=GptOssForCausalLM(tiny_config(VOCAB_SIZE)), args=config,
               train_dataset=hf_trainer.as_dataset(rows), eval_dataset=hf_trainer.as_dataset(rows[:8]),
               processing_class=embedded_tokenizer())  # a fresh tokenizer object each time, as each job loads its own


def test_a_second_trainer_over_the_same_rows_reuses_the_prepared_dataset(tmp_path):
    prepared_data._cache.clear()
    first = build(tmp_path / "a")
    second = build(tmp_path / "b")
    assert second.train_dataset is first.train_dataset
    assert second.eval_dataset is first.eval_dataset


def test_the_cached_dataset_is_what_trl_prepares_fresh(tmp_path):
    from trl import SFTTrainer

    prepared_data._cache.clear()
    build(tmp_path / "a")
    cached = build(tmp_path / "b").train_dataset
    fresh = build(tmp_path / "c", trainer_base=SFTTrainer).train_dataset
    assert cached.column_names == fresh.column_names
    assert cached.to_list() == fresh.to_list()


def test_different_rows_or_arguments_prepare_again(tmp_path):
    prepared_data._cache.clear()
    base = build(tmp_path / "a").train_dataset
    assert build(tmp_path / "b", max_length=64).train_dataset is not base
    assert build(tmp_path / "c", rows=ROWS[:30]).train_dataset is not base
    assert build(tmp_path / "d", seed=1).train_dataset is not base
    assert len(prepared_data._cache) <= prepared_data.KEEP
