"""Trainer overhead of QAT on CPU: the same demo batches through three trainers, side by side in one process.

  sft            TRL's SFTTrainer on the unquantized tiny model (the SFT stage)
  sft-on-fq      TRL's SFTTrainer on the MXFP4 fake-quantized model (our backend + fast experts path)
  modelopt-qat   modelopt's QATSFTTrainer on that model (gc.collect() before every step)
  studio-qat     the QAT stage's trainer (engine/stages/qat.py: modelopt's, without the per-step collect)

    python bench/qat_trainer_cpu.py [--steps 40] [--threads 2]

The tiny model is randomly initialised (speed does not depend on the weights); the data and arguments are the demo
recipe's QAT settings with evaluation and checkpoints off. Prints seconds per step and the ratio to `sft`.

Result: a table on stdout (seconds per step, ratio to `sft`); quoted with the date in README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from engine.fp4 import fast_experts, torch_backend, modelopt_glue  # noqa: E402
from engine.data import embedded_model  # noqa: E402
from engine.training import hf_trainer  # noqa: E402
from engine.recipe.configs import Recipe  # noqa: E402
from engine.data.chat_data import load_chat_dataset, split_train_eval  # noqa: E402
from engine.runtime.workspace import REPO_ROOT  # noqa: E402


class _CountCollects:
    def __init__(self):
        self.calls, self._real = 0, gc.collect

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        gc.collect = counting
        return self

    def __exit__(self, *exc):
        gc.collect = self._real


def build(fake_quant: bool):
    torch.manual_seed(0)
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(embedded_model.tiny_config(embedded_model.VOCAB_SIZE))
    if fake_quant:
        torch_backend.register()
        calib = torch.randint(0, embedded_model.VOCAB_SIZE, (2, 64))
        model = modelopt_glue.quantize(model, "mxfp4", lambda m: m(input_ids=calib), modelopt_glue.resolve_backend("auto", "cpu"))
        fast_experts.enable(model)
    return model


def trainer_for(name: str):
    from trl import SFTTrainer

    if name == "modelopt-qat":
        from modelopt.torch.quantization.plugins.trl import QATSFTTrainer

        return QATSFTTrainer, {"quant_args": None}
    if name == "studio-qat":
        from engine.stages.qat import trainer_class

        return trainer_class(), {"quant_args": None}
    return SFTTrainer, {}


def measure(name: str, recipe: Recipe, rows: list[dict], steps: int, tokenizer) -> dict:
    cfg = recipe.qat.model_copy(update={"max_steps": steps, "logging_steps": steps, "save_steps": 10**6})
    ctx = type("Ctx", (), {"device": torch.device("cpu"), "dtype": torch.float32})()
    with tempfile.TemporaryDirectory() as out:
        args = hf_trainer.trl_args(cfg, ctx, Path(out), recipe.data.max_length)
        args.eval_strategy = "no"
        base, extra = trainer_for(name)
        trainer = base(model=build(name != "sft"), args=args, train_dataset=hf_trainer.as_dataset(rows),
                       processing_class=tokenizer, **extra)
        with _CountCollects() as collects:
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
    return {"trainer": name, "s_per_step": seconds / steps, "gc_collects": collects.calls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trainers", default="sft,sft-on-fq,modelopt-qat,studio-qat")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe.model_validate(yaml.safe_load((REPO_ROOT / "assets/recipes/demo.yaml").read_text()))
    rows = load_chat_dataset(recipe.data.source, root=REPO_ROOT / "assets")
    train, _ = split_train_eval(rows, recipe.data.eval_fraction, recipe.data.split_seed)
    tokenizer = embedded_model.load_tokenizer()
    results = [measure(name, recipe, train[:4000], args.steps, tokenizer) for name in args.trainers.split(",")]
    base = results[0]["s_per_step"]
    print(f"\n{args.steps} steps, batch {recipe.qat.per_device_train_batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"| trainer | s/step | vs {results[0]['trainer']} | gc.collect calls |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['trainer']} | {r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f}x | {r['gc_collects']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
