"""Stage 1: supervised fine-tuning in high precision (TRL SFTTrainer), loss on assistant tokens only.

With LoRA (engine/training/lora.py) only the adapters are saved; later stages load the base and merge them
(engine/training/stage_outputs.py), so they see the same plain model a merged copy held.
Under `accelerate launch` every rank runs this; only the main one writes the model (hf_trainer.save_final).
"""

from __future__ import annotations

from engine.training import lora, hf_trainer
from engine.runtime.context import Context
from engine.stages.common import load_splits, open_model
from engine.runtime.workspace import checkpoint_dir


def run(ctx: Context) -> dict:
    from trl import SFTTrainer

    cfg = ctx.recipe.sft
    model, tokenizer = open_model(ctx, "prepare", consume=True)
    out = checkpoint_dir(ctx.run_dir, "sft")
    trainer = hf_trainer.make_trainer(SFTTrainer, ctx, cfg, out, model, tokenizer, load_splits(ctx), "SFT",
                                    peft_config=lora.lora_config(cfg, model) if cfg.lora else None)
    metrics = hf_trainer.train(trainer, ctx, out)
    # LoRA: the adapters and a pointer to the base (engine/training/stage_outputs.py), not a merged copy.
    with ctx.phase("save"):
        hf_trainer.save_final(trainer, tokenizer, ctx.model_dir("sft"), adapters_of="prepare" if cfg.lora else None)
    return hf_trainer.stage_result(metrics)
