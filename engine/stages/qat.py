"""Stage 3: quantization-aware training: keep training the fake-quantized model at a smaller lr.

Runs modelopt's QATSFTTrainer (TRL's SFTTrainer plus modelopt's state handling) on the PTQ model, so QAT starts
from exactly the calibrated quantizers the PTQ baseline was evaluated with. With LoRA the base weights stay frozen
and the adapters train through the fake quantizers; they are merged before saving (engine/lora.py says exactly what
the merged, exported weights are).
"""

from __future__ import annotations

from engine import lora, training
from engine.context import Context
from engine.stages.common import load_splits, open_model
from engine.workspace import checkpoint_dir


def run(ctx: Context) -> dict:
    from modelopt.torch.quantization.plugins.trl import QATSFTTrainer

    fmt = ctx.job["fmt"]
    cfg = ctx.recipe.qat
    model, tokenizer = open_model(ctx, f"ptq:{fmt}")
    # LoRA: adapters injected before the trainer sees the model, the fake quantizers kept in front of W + BA.
    adapters = lora.add_adapters(model, cfg, log=ctx.log) if cfg.lora else None
    out = checkpoint_dir(ctx.run_dir, "qat", fmt)
    trainer = training.make_trainer(QATSFTTrainer, ctx, cfg, out, model, tokenizer, load_splits(ctx), f"QAT {fmt}",
                                    quant_args=None)  # already quantized by the PTQ stage
    metrics = training.train(trainer, ctx, out)
    merge = (lambda _: lora.merge(adapters)) if adapters is not None else None
    training.save_final(trainer, tokenizer, ctx.model_dir(f"qat:{fmt}"), merge=merge)
    return training.stage_result(metrics)
