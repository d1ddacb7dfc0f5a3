"""Stage 1: supervised fine-tuning in high precision (TRL SFTTrainer), loss on assistant tokens only.

With LoRA (engine/lora.py) the adapters are merged into the weights before saving, so later stages see a plain model.
Under `accelerate launch` every rank runs this; only the main one writes the model (training.save_final).
"""

from __future__ import annotations

from engine import lora, training
from engine.context import Context
from engine.stages.common import load_splits, open_model
from engine.workspace import checkpoint_dir


def run(ctx: Context) -> dict:
    from trl import SFTTrainer

    cfg = ctx.recipe.sft
    model, tokenizer = open_model(ctx, "prepare")
    train_rows, eval_rows = load_splits(ctx)
    out = checkpoint_dir(ctx.run_dir, "sft")
    trainer_cls = training.atomic_trainer(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=training.trl_args(cfg, ctx, out, ctx.recipe.data.max_length),
        train_dataset=training.as_dataset(train_rows),
        eval_dataset=training.as_dataset(eval_rows[: cfg.eval_examples]),
        processing_class=tokenizer,
        peft_config=lora.lora_config(cfg, model) if cfg.lora else None,
        callbacks=[training.StoreMetricsCallback(ctx, "SFT")],
    )
    metrics = training.train(trainer, ctx, out)
    training.save_final(trainer, tokenizer, ctx.model_dir("sft"), merge=lora.merge if cfg.lora else None)
    return {k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "train_runtime")}
