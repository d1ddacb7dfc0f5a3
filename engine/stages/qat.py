"""Stage 3: quantization-aware training: keep training the fake-quantized model at a smaller lr.

Runs modelopt's QATSFTTrainer (TRL's SFTTrainer plus modelopt's state handling) on the PTQ model, so QAT starts
from exactly the calibrated quantizers the PTQ baseline was evaluated with.
"""

from __future__ import annotations

from engine import models, training
from engine.context import Context
from engine.stages.common import load_splits, open_model
from engine.workspace import checkpoint_dir


def run(ctx: Context) -> dict:
    from modelopt.torch.quantization.plugins.trl import QATSFTTrainer

    fmt = ctx.job["fmt"]
    cfg = ctx.recipe.qat
    model, tokenizer = open_model(ctx, f"ptq:{fmt}")
    train_rows, eval_rows = load_splits(ctx)
    out = checkpoint_dir(ctx.run_dir, "qat", fmt)
    trainer_cls = training.atomic_trainer(QATSFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=training.trl_args(cfg, ctx, out, ctx.recipe.data.max_length),
        train_dataset=training.as_dataset(train_rows),
        eval_dataset=training.as_dataset(eval_rows[: cfg.eval_examples]),
        processing_class=tokenizer,
        callbacks=[training.StoreMetricsCallback(ctx, f"QAT {fmt}")],
        quant_args=None,  # already quantized by the PTQ stage
    )
    metrics = training.train(trainer, ctx, out)
    models.save_model_atomic(trainer.model, tokenizer, ctx.model_dir(f"qat:{fmt}"))
    return {k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "train_runtime")}
