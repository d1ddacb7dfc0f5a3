"""Helpers the stages share: the data splits, the FP4 backend for this job, opening a stage's model."""

from __future__ import annotations

from pathlib import Path

from engine.fp4 import model_io, modelopt_glue
from engine.runtime.context import Context
from engine.runtime import workspace
from engine.runtime.workspace import ASSETS


def load_splits(ctx: Context) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows, deterministic for a given recipe."""
    from engine.data.chat_data import load_chat_dataset, split_train_eval

    data = ctx.recipe.data
    rows = load_chat_dataset(data.source, root=ASSETS)
    if data.eval_source:
        return rows, load_chat_dataset(data.eval_source, root=ASSETS)
    return split_train_eval(rows, data.eval_fraction, data.split_seed)


def backend(ctx: Context) -> str | None:
    return modelopt_glue.resolve_backend(ctx.recipe.hardware.fp4_backend, ctx.device)


def model_path(ctx: Context, key: str) -> Path:
    return workspace.model_path(ctx.run_dir, key)


def open_model(ctx: Context, key: str):
    """(model, tokenizer) of the stage with job key `key`, on this job's device."""
    path = model_path(ctx, key)
    trust = ctx.recipe.model.trust_remote_code
    quantized = (Path(path) / "modelopt_state.pth").exists()
    model = model_io.load_model(path, ctx.dtype, ctx.device, backend=backend(ctx) if quantized else None,
                              trust_remote_code=trust)
    if model_io.is_modelopt_model(model) and ctx.recipe.hardware.fp4_backend == "auto":
        from engine.fp4 import fast_experts

        switched = fast_experts.enable(model)
        ctx.log(f"fast experts path on {switched} expert modules (fake quant once per forward, grouped_mm)")
    tokenizer = model_io.load_tokenizer(path, trust_remote_code=trust)
    return model, tokenizer
