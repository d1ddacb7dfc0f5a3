"""Stage 3: quantization-aware training: keep training the fake-quantized model at a smaller lr.

Runs modelopt's QATSFTTrainer (TRL's SFTTrainer plus modelopt's state handling) on the PTQ model, so QAT starts
from exactly the calibrated quantizers the PTQ baseline was evaluated with. With LoRA the base weights stay frozen
and the adapters train through the fake quantizers; only they are saved, and merged when a later stage loads the model
(engine/training/stage_outputs.py; engine/training/lora.py says exactly what the merged, exported weights are).
"""

from __future__ import annotations

from engine.training import lora, hf_trainer
from engine.runtime.context import Context
from engine.stages.common import load_splits, open_model
from engine.runtime.workspace import checkpoint_dir


def run(ctx: Context) -> dict:
    fmt = ctx.job["fmt"]
    cfg = ctx.recipe.qat
    model, tokenizer = open_model(ctx, f"ptq:{fmt}", consume=True)
    # LoRA: adapters injected before the trainer sees the model, the fake quantizers kept in front of W + BA.
    adapters = lora.add_adapters(model, cfg, log=ctx.log) if cfg.lora else None
    out = checkpoint_dir(ctx.run_dir, "qat", fmt)
    trainer = hf_trainer.make_trainer(trainer_class(), ctx, cfg, out, model, tokenizer, load_splits(ctx), f"QAT {fmt}",
                                    quant_args=None)  # already quantized by the PTQ stage
    metrics = hf_trainer.train(trainer, ctx, out)
    # LoRA: the adapters + quantizer buffers and a pointer to the PTQ model; merged when a later stage loads it.
    with ctx.phase("save"):
        hf_trainer.save_final(trainer, tokenizer, ctx.model_dir(f"qat:{fmt}"),
                              adapters_of=f"ptq:{fmt}" if adapters is not None else None, adapters=adapters)
    return hf_trainer.stage_result(metrics)


def trainer_class() -> type:
    """modelopt's QATSFTTrainer without its `gc.collect()` before every training and prediction step.

    modelopt 0.47's QATTrainer collects unconditionally (its base class makes the same collect opt-in, `manual_gc`,
    "to work around GPU memory leaks"). In a process holding the dataset and the model one collect took ~0.38 s on
    2 CPU cores: a demo QAT step cost 0.600 s against 0.213 s without it and 0.189 s for SFT
    (bench/qat_trainer_cpu.py). The H100 QAT benchmark (docs/benchmarks.md) trains without per-step collects at
    BF16's peak memory. QATTrainer's step only collects, then quantizes if the model is not quantized yet; ours arrives
    quantized by the PTQ stage (`quant_args=None`), so skipping it changes nothing else.
    """
    from modelopt.torch.quantization.plugins.transformers_trainer import QATTrainer
    from modelopt.torch.quantization.plugins.trl import QATSFTTrainer

    class StudioQATSFTTrainer(QATSFTTrainer):
        def training_step(self, *args, **kwargs):
            if self.quant_cfg is not None:  # would quantize here: keep modelopt's step as it is
                return super().training_step(*args, **kwargs)
            return super(QATTrainer, self).training_step(*args, **kwargs)

        def prediction_step(self, *args, **kwargs):
            if self.quant_cfg is not None:
                return super().prediction_step(*args, **kwargs)
            return super(QATTrainer, self).prediction_step(*args, **kwargs)

    return StudioQATSFTTrainer
