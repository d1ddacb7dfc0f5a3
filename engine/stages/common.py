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


def open_model(ctx: Context, key: str, consume: bool = False):
    """(model, tokenizer) of the stage with job key `key`, on this job's device.

    Reused from the previous job of this process when it loaded the same model (engine/stages/job.py chains the
    jobs of a run): an evaluation followed by the export of the same QAT model loads it once. Only models read
    from disk are kept, or one a stage saved that equals a load of its output (keep_model), never a model a stage
    changed afterwards, so a reused model is the one a fresh load would give.
    `consume=True` is for stages that change the model (train, quantize): they take it out of the cache.
    """
    cached = ctx.models.pop(key, None) if consume else ctx.models.get(key)
    if cached is not None:
        ctx.log(f"reusing {key}'s model, loaded by the previous job of this process")
        return cached
    with ctx.phase("load"):  # the job's timing counts loading apart from compute
        kept = _take_ancestor(ctx, key)
        release_models(ctx.models)  # one model at a time: free the last one before loading another
        model, tokenizer = _load(ctx, key, kept)
    if not consume:
        ctx.models[key] = (model, tokenizer)
    return model, tokenizer


def release_models(models: dict) -> None:
    """Drop the models kept for a chain and give their memory back (GPU memory included)."""
    if not models:
        return
    models.clear()
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _take_ancestor(ctx: Context, key: str) -> dict:
    """{ancestor: model} when the model kept from the previous job is one `key` is built on (a LoRA SFT's base, the
    PTQ model under a LoRA QAT): taken out of the cache, since building on it changes it. Else {}."""
    from engine.training import stage_outputs

    for ancestor in stage_outputs.lineage(ctx.run_dir, key)[1:]:
        if ancestor in ctx.models:
            ctx.log(f"building {key} on {ancestor}'s model, loaded by the previous job of this process")
            return {ancestor: ctx.models.pop(ancestor)[0]}
    return {}


def _load(ctx: Context, key: str, kept: dict | None = None):
    from engine.training import stage_outputs

    path = model_path(ctx, key)
    trust = ctx.recipe.model.trust_remote_code
    # A stage that kept only adapters / quantizers is rebuilt from its parent (engine/training/stage_outputs.py).
    model = stage_outputs.load(ctx.run_dir, key, ctx.dtype, ctx.device, backend(ctx), trust_remote_code=trust,
                               kept=kept)
    _as_loaded(ctx, model)
    tokenizer = model_io.load_tokenizer(path, trust_remote_code=trust)
    return model, tokenizer


def _as_loaded(ctx: Context, model) -> None:
    """What every load does after reading a model: the fast experts path for a quantized one (engine/fp4/fast_experts)."""
    if model_io.is_modelopt_model(model) and ctx.recipe.hardware.fp4_backend == "auto":
        from engine.fp4 import fast_experts

        switched = fast_experts.enable(model)
        ctx.log(f"fast experts path on {switched} expert modules (fake quant once per forward, grouped_mm)")


def keep_model(ctx: Context, key: str, model, tokenizer) -> None:
    """Offer the model a stage just saved to the next job of this process, as if open_model(key) had loaded it.

    Only for a stage whose model in memory is exactly what loading its output gives: PTQ (calibration changes no
    weight, and the quantizers it saved are this model's; tests/test_lora.py compares state and logits with a fresh
    load). Its evaluation, chained next, then needs no second read of the model (a 13 GB base at 20b size).
    """
    release_models(ctx.models)
    _as_loaded(ctx, model)
    ctx.models[key] = (model, tokenizer)


def reuses(needed: str | None, kept: str | None, run_dir: Path) -> int:
    """How a job needing model `needed` uses the model `kept` in memory: 0 it is that model, 1 it is built on it
    (stage_outputs.lineage), 2 not at all. claim_next_job takes the lowest first."""
    from engine.training import stage_outputs

    if kept is None or needed is None:
        return 2
    if needed == kept:
        return 0
    return 1 if kept in stage_outputs.lineage(run_dir, needed)[1:] else 2


def model_needed(job: dict, recipe) -> str | None:
    """The job key of the model a job starts from (what open_model will load), or None (report)."""
    stage, fmt = job["stage"], job["fmt"]
    if stage in ("evaluate", "export"):
        return job["target"]
    if stage == "sft":
        return "prepare"
    if stage == "ptq":
        return job["config"].get("source", "sft" if recipe.sft.enabled else "prepare")
    if stage == "qat":
        return f"ptq:{fmt}"
    return None
