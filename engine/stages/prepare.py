"""Stage 0: resolve the base model and check the data, before any training starts."""

from __future__ import annotations

from pathlib import Path

from engine.fp4 import model_io
from engine.recipe.configs import EMBEDDED_MODEL
from engine.runtime.context import Context
from engine.runtime import workspace
from engine.stages.common import load_splits


def run(ctx: Context) -> dict:
    source = ctx.recipe.model.source
    if source == EMBEDDED_MODEL:
        ctx.progress(0.0, "preparing the embedded tiny gpt-oss (pre-trained once, then cached)")
        # The first run pre-trains it (~2 min on 2 CPU cores): the job's progress moves with it, not only its log.
        path = ensure_embedded_base(ctx.cache_dir, ctx.recipe.model, ctx.device.type, log=ctx.log,
                                    on_step=lambda step, steps: ctx.progress(0.5 * step / steps))
    else:
        path = resolve_checkpoint(source)
    ctx.progress(0.5, f"checking the checkpoint at {path}")
    summary = model_io.check_gpt_oss_checkpoint(Path(path))
    ctx.log(f"gpt-oss checkpoint: {summary['layers']} layers, {summary['experts']} experts, "
            f"{'MXFP4 experts (upcast on load)' if summary['quantized'] else 'unquantized'}")
    workspace.write_base_pointer(ctx.run_dir, path, {"source": source, "quantized": summary["quantized"]})
    ctx.store.add_artifact(ctx.run_id, ctx.job_id, "base_model", str(path), sha256="", meta={"source": source})

    ctx.progress(0.8, "checking the dataset against the model's tokenizer")
    check_data_lengths(ctx, model_io.load_tokenizer(path, trust_remote_code=ctx.recipe.model.trust_remote_code))
    train_rows, eval_rows = load_splits(ctx)
    return {"base_model": str(path), "train_rows": len(train_rows), "eval_rows": len(eval_rows)}


def ensure_embedded_base(cache_dir: Path, model, device: str, log=print, on_step=None) -> Path:
    """The embedded base this recipe's `model` section asks for (the MXFP4-released one or the BF16 one), built once
    per cache. Also what bench/engine_overhead.py warms its cache with, so its timed runs find the same base."""
    from engine.data.embedded_model import ensure_tiny_base
    from engine.fp4.mxfp4_release import ensure_mxfp4_base

    ensure = ensure_mxfp4_base if model.tiny_release == "mxfp4" else ensure_tiny_base
    return ensure(cache_dir, steps=model.tiny_pretrain_steps, log=log, device=device, on_step=on_step)


def check_data_lengths(ctx: Context, tokenizer) -> None:
    """Examples longer than data.max_length would be cut silently by the trainer: refuse them, naming the rows."""
    from engine.data.chat_data import DataError, check_lengths, load_chat_dataset
    from engine.runtime.workspace import ASSETS

    data = ctx.recipe.data
    issues = []
    for source in filter(None, (data.source, data.eval_source)):
        issues += check_lengths(load_chat_dataset(source, root=ASSETS), tokenizer, data.max_length, source=source)
    if issues:
        raise DataError(issues)


def resolve_checkpoint(source: str) -> Path:
    """A local directory as is; a hub id downloaded into the HF cache (needs a network)."""
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local}: no config.json; point model.source at a Hugging Face model directory")
        return local.resolve()
    if local.exists():
        raise ValueError(f"{local}: is a file; model.source must be a model directory or a hub id")
    from huggingface_hub import snapshot_download

    try:
        # openai/gpt-oss-* also ship original/ (OpenAI's own layout) and metal/ weights: not needed, many GB.
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                              "tokenizer*"], ignore_patterns=["original/*", "metal/*"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean the same to the user
        raise RuntimeError(f"could not fetch model '{source}' from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                           "check the id and your network, or download it and pass the local directory") from None
