"""Stage 1: supervised fine-tuning in high precision (TRL SFTTrainer), loss on assistant tokens only."""

from __future__ import annotations

from engine import models, training
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
        peft_config=training.lora_config(cfg) if cfg.lora else None,
        callbacks=[training.StoreMetricsCallback(ctx, "SFT")],
    )
    metrics = training.train(trainer, ctx, out)
    trained = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    models.save_model_atomic(trained, tokenizer, ctx.model_dir("sft"))
    return {k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "train_runtime")}
