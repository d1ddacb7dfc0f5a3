"""Stage 2: post-training quantization (the baseline QAT must beat): insert modelopt quantizers, calibrate."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from engine.fp4 import modelopt_glue
from engine.runtime.context import Context
from engine.stages.common import backend, keep_model, load_splits, open_model
from engine.training import stage_outputs


def run(ctx: Context) -> dict:
    fmt = ctx.job["fmt"]
    cfg = ctx.recipe.ptq
    source = ctx.job["config"].get("source", "sft" if ctx.recipe.sft.enabled else "prepare")
    model, tokenizer = open_model(ctx, source, consume=True)
    train_rows, _ = load_splits(ctx)
    calib = random.Random(cfg.calib_size).sample(train_rows, min(cfg.calib_size, len(train_rows)))
    if backend(ctx) is None and not any(Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/nonexistent")).glob("*mx*")):
        ctx.progress(0.05, "compiling modelopt's CUDA extension (first use only, ~90 s; cached in the workspace)")
    ctx.progress(0.1, f"quantizing to {fmt} (calibrating on {len(calib)} training examples)")
    model = modelopt_glue.quantize(model, fmt, calibration_loop(tokenizer, calib, ctx.recipe.data.max_length), backend(ctx),
                           cfg.block_size)
    summary = modelopt_glue.quant_summary(model)
    out = ctx.model_dir(f"ptq:{fmt}")
    # The quantizers only, and a pointer to `source`: calibration changes no weight (engine/training/stage_outputs.py).
    with ctx.phase("save"):
        stage_outputs.save_quantized(out, source, model, tokenizer)
    (out / "quant_summary.json").write_text(json.dumps(summary, indent=1))
    keep_model(ctx, f"ptq:{fmt}", model, tokenizer)  # its evaluation, chained next, needs no second load
    enabled = [row for row in summary if row["enabled"]]
    return {"format": fmt, "quantizers_enabled": len(enabled), "quantizers_total": len(summary)}


def calibration_loop(tokenizer, rows: list[dict], max_length: int, batch_size: int = 8):
    """modelopt's forward_loop: run the calibration conversations through the model (max calibration)."""

    @torch.no_grad()
    def forward_loop(model) -> None:
        device = next(model.parameters()).device
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(device)
            model(**enc)

    return forward_loop
