"""Training: TRL/transformers trainers with our metrics, resume and atomic saves (`hf_trainer`), LoRA (`lora`),
the memory / step-time estimate (`estimate`) and the recipe advisor (`recipe_advisor`).

May import: `engine.recipe`, `engine.data`, `engine.fp4`, `engine.runtime` (context, workspace, distributed rank).
"""
