"""The embedded default model: a ~1M-parameter gpt-oss, its tokenizer, and its deterministic base pre-training.

The architecture is transformers' real GptOss (MoE experts with biases and clamped SwiGLU, attention sinks,
alternating sliding/full attention, YaRN rope), only small. Pre-training teaches the *base behaviour* of
engine/data/demo_tasks.py (English reasoning whatever is asked; refusing benign prompts with alarming words) so the
SFT -> PTQ -> QAT story starts where NVIDIA's gpt-oss-20b one does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    GptOssConfig,
    GptOssForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from engine.data import demo_tasks
from engine.data.harmony import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, EOS_TOKENS, PAD_TOKEN, ROLES, SPECIAL_TOKENS

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "tokenizer"
# Model vocab: the tokenizer's tokens padded up to a round size, as gpt-oss pads o200k (200,019) to 201,088.
VOCAB_SIZE = 2048
# gpt-oss's default YaRN rope stretches a 4,096-token original context 32x; keeping the real model's
# max_position_embeddings (= 4096 * 32) keeps that rope consistent (and transformers quiet). Only the rope depends
# on it: no buffer is sized by it, and our examples are < 100 tokens.
MAX_POSITIONS = 131_072
# Training recipe of the base model; part of the cache key, so changing it retrains.
PRETRAIN = {"batch_size": 32, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 30, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "betas": (0.9, 0.95), "version": 1}


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2/o200k, with the harmony special tokens first (ids 0..8, see `special_id`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Role and channel names are plain text in harmony: make sure they are in the corpus.
    tokenizer.train_from_iterator([*ROLES, "analysis", "final", "commentary", *texts], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, as gpt-oss ships it.
    tokenizer.save_pretrained(directory, save_jinja_files=False)


def load_tokenizer(directory: Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(directory))


@functools.lru_cache(maxsize=1)
def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded tokenizer, loaded once per process. The web process uses it to validate and preview datasets;
    only read from it (apply_chat_template, encode), never change it."""
    return load_tokenizer()


def special_id(token: str) -> int:
    """Id of a harmony special token in our tokenizer (trained with them first, in SPECIAL_TOKENS order)."""
    return SPECIAL_TOKENS.index(token)


# ---------------------------------------------------------------- model


# The experts' shape: 4 experts (top-2), intermediate 128 (a multiple of the FP4 block of 32). bench/demo_study.py
# tries other shapes through `shape=` (same keys); a base of another shape gets another cache key (its config differs).
SHAPE = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128}


def tiny_config(vocab_size: int, shape: dict | None = None) -> GptOssConfig:
    """gpt-oss in miniature: 2 layers, hidden 128, the experts of SHAPE (or `shape`, keys as SHAPE's)."""
    experts = {**SHAPE, **(shape or {})}
    if set(experts) != set(SHAPE):
        raise ValueError(f"shape keys must be among {sorted(SHAPE)}; got {sorted(shape or {})}")
    config = GptOssConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, **experts,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=special_id(BOS_TOKEN), eos_token_id=special_id(EOS_TOKEN), pad_token_id=special_id(PAD_TOKEN),
        architectures=["GptOssForCausalLM"],
    )
    config._attn_implementation = "eager"  # attention sinks need eager (or flash/flex kernels) in transformers
    return config


def generation_config() -> GenerationConfig:
    return GenerationConfig(
        eos_token_id=[special_id(t) for t in EOS_TOKENS], pad_token_id=special_id(PAD_TOKEN),
        bos_token_id=special_id(BOS_TOKEN), do_sample=False,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- pre-training


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(steps: int, seed: int, tokenizer_dir: Path = TOKENIZER_DIR, device: str = "cpu",
              shape: dict | None = None) -> str:
    """Identifies a pre-trained base: same key, same weights. A base trained on a GPU gets its own key (its float
    rounding differs from the CPU's; each is deterministic on its own kind of device)."""
    config = tiny_config(VOCAB_SIZE, shape).to_dict()
    config.pop("transformers_version", None)
    tokenizer_files = [_file_sha(tokenizer_dir / f) for f in ("tokenizer.json", "tokenizer_config.json")]
    fields = {
        "config": config, "generator": demo_tasks.GENERATOR_VERSION, "steps": steps, "seed": seed,
        "recipe": PRETRAIN, "tokenizer": tokenizer_files,
    }
    if device != "cpu":  # keeps the CPU key of every base cached before GPUs could pre-train
        fields["device"] = device
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; labels are -100 outside the assistant's tokens."""
    encoded = tokenizer.apply_chat_template(
        [row["messages"] for row in rows], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    return [
        (ids, [t if m else -100 for t, m in zip(ids, mask)])
        for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"])
    ]


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(examples):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio of the peak."""
    warmup = min(PRETRAIN["warmup_steps"], max(1, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = PRETRAIN["min_lr_ratio"]
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """Multi-threaded CPU backward (the embedding's scatter-add) is not bit-reproducible otherwise."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def pretrain(
    tokenizer: PreTrainedTokenizerBase, steps: int, seed: int, log: Callable[[str], None], device: str = "cpu",
    on_step: Callable[[int, int], None] | None = None, shape: dict | None = None,
) -> GptOssForCausalLM:
    """Plain fp32 torch loop. Loss on assistant tokens only: the prompts are templates with random slot values,
    so predicting them would spend the small model's capacity on noise instead of the behaviour we evaluate.

    On a GPU the same loop (same batches, same hyperparameters) runs on the device: on the H200 the CPU loop was
    ~50 of the demo's 482 s (2026-12-03), ~0.08 s a step, where the GPU step is launch-bound at a few ms."""
    torch.manual_seed(seed)
    assert len(tokenizer) <= VOCAB_SIZE, "retrain the tokenizer or raise VOCAB_SIZE"
    if device != "cpu":  # cuBLAS is deterministic only with a fixed workspace (set before its first call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    model = GptOssForCausalLM(tiny_config(VOCAB_SIZE, shape)).to(device)
    model.train()
    batch_size = PRETRAIN["batch_size"]
    examples = encode_rows(tokenizer, demo_tasks.pretrain_rows(steps * batch_size, seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], betas=PRETRAIN["betas"],
                                  weight_decay=PRETRAIN["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    log_every = max(1, min(50, steps // 10))
    with deterministic_torch():
        train_loop(model, examples, optimizer, scheduler, tokenizer.pad_token_id, steps, log_every, log, on_step)
    model.eval()
    return model.to("cpu")


def train_loop(model: GptOssForCausalLM, examples: list[tuple[list[int], list[int]]],
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, pad_id: int,
                steps: int, log_every: int, log: Callable[[str], None],
                on_step: Callable[[int, int], None] | None = None) -> None:
    batch_size = PRETRAIN["batch_size"]
    for step in range(steps):
        batch = _collate(examples[step * batch_size : (step + 1) * batch_size], pad_id)
        loss = model(**{k: v.to(model.device, non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PRETRAIN["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f}")
            if on_step is not None:
                on_step(step + 1, steps)


def ensure_tiny_base(cache_root: Path, steps: int = 600, log: Callable[[str], None] = print, seed: int = 0,
                     device: str = "cpu", on_step: Callable[[int, int], None] | None = None,
                     shape: dict | None = None) -> Path:
    """Pre-train the embedded base model once and cache it; later calls return the cached directory at once.
    `on_step(step, steps)` is called each time a step is logged (about every tenth of the run): job progress.

    The directory holds model + tokenizer (with the chat template) + generation config, loadable offline with
    `from_pretrained`. It is written to a temporary directory and renamed into place, so an interrupted run never
    leaves a half-written cache.
    """
    cache_root = Path(cache_root)
    target = cache_root / f"tiny-gpt-oss-base-{cache_key(steps, seed, device=device, shape=shape)}"
    if (target / "config.json").exists():
        log(f"tiny base model cached at {target}")
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    log(f"pre-training the tiny gpt-oss base model ({steps} steps, seed {seed}, on {device}) ...")
    started = time.perf_counter()
    model = pretrain(tokenizer, steps, seed, log, device, on_step, shape)
    seconds = time.perf_counter() - started
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-base-", dir=cache_root))
    try:
        model.generation_config = generation_config()
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        info = {"steps": steps, "seed": seed, "device": device, "seconds": round(seconds, 1),
                "parameters": count_parameters(model)}
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # unless a concurrent pre-train won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; junk otherwise
    log(f"tiny base model ready in {seconds:.0f}s at {target}")
    return target
