"""Does the embedded demo show what happens to gpt-oss? SFT -> PTQ / QAT / control, per shape, base and SFT lr.

For each setting, in one process, with the engine's own pieces (the SFT stage's trainer, the PTQ stage's modelopt
quantization and calibration, the QAT stage's trainer, the evaluate stage's generation, pass rule and rows):
  SFT      the demo recipe's SFT (assets/recipes/demo.yaml) at --sft-lr, from the base
  PTQ      the SFT model quantized to each --formats (calibrated as the PTQ stage does)
  QAT      PTQ trained on for the recipe's QAT steps at its lr (modelopt's QAT trainer, as the QAT stage)
  control  the SFT model trained on for the same steps at the same lr in high precision, then PTQ: what the extra
           training alone gives (if it recovers as much as QAT, QAT's gain is not about the quantization)
Every model is judged on the same held-out conversations with the same pass rule as the demo's evaluate stage
(the recipe's eval split, `eval.max_examples_per_task` per task, greedy, `eval.max_new_tokens`); nothing about the
evaluation can be changed from here. The base is the embedded model released in MXFP4 (engine/fp4/mxfp4_release.py)
or the plain BF16 one (--bases), of the default shape or another (--shapes, e.g. e16k2 = 16 experts, top-2).

    nice python bench/demo_study.py --bases mxfp4,bf16 --sft-lrs 2e-4,5e-4,1e-3,2e-3 --formats mxfp4

Result: a table on stdout per setting (pass rate per task with 95 % Wilson intervals; PTQ's drop, the share of it
QAT and the control recover; the fine-tune survival of each quantized model); --json FILE appends one JSON line per
setting as it finishes. Recorded, with the date, in docs/demo_study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

SHAPES = {  # name -> embedded_model.SHAPE overrides
    "e4k2": {},  # today's: 4 experts, top-2, intermediate 128 (experts 39 % of the parameters)
    "e16k2": {"num_local_experts": 16, "num_experts_per_tok": 2},  # experts 72 %, same compute per token
    "e32k4": {"num_local_experts": 32, "num_experts_per_tok": 4, "intermediate_size": 64},  # gpt-oss's routing
}


def recipe_of(path: Path):
    from engine.recipe.configs import Recipe

    return Recipe.model_validate(yaml.safe_load(path.read_text()))


_TOKENIZED: dict = {}  # TRL's tokenized training set, made by the first trainer and handed to the next ones


def train(model, tokenizer, cfg, recipe, rows, quantized: bool):
    """The SFT (or, quantized, the QAT) stage's trainer on `model` for cfg.max_steps; no checkpoints, no eval.
    The rows are tokenized once (TRL skips a dataset that already has input_ids): ~40 s a trainer otherwise."""
    from trl import SFTTrainer

    from engine.stages.qat import trainer_class
    from engine.training import hf_trainer

    cfg = cfg.model_copy(update={"save_steps": 10**6, "logging_steps": max(1, cfg.max_steps // 4)})
    device = type("Device", (), {"device": torch.device("cpu"), "dtype": torch.float32})()  # trl_args reads these
    with tempfile.TemporaryDirectory() as out:
        args = hf_trainer.trl_args(cfg, device, Path(out), recipe.data.max_length)
        args.eval_strategy = "no"
        base, extra = (trainer_class(), {"quant_args": None}) if quantized else (SFTTrainer, {})
        dataset = _TOKENIZED.get(id(rows)) or hf_trainer.as_dataset(rows)
        trainer = hf_trainer.atomic_trainer(base)(model=model, args=args, train_dataset=dataset,
                                                  processing_class=tokenizer, **extra)
        _TOKENIZED[id(rows)] = trainer.train_dataset
        trainer.loss_path = hf_trainer.loss_path(recipe.hardware.chunked_loss, recipe.hardware.strategy)
        trainer.train()
    model.config.output_router_logits = False
    return model


def fresh_copy(model, path: Path):
    """An independent copy of a trained model: the base loaded again with the trained weights.

    Not copy.deepcopy: the Trainer leaves an instance-level `forward` bound to the model it trained (accelerate's
    wrapper), so a deep copy runs the *original* model's modules. Measured: zeroing a deep copy's expert weights
    left its logits unchanged (max |diff| 0.0), which made every copy evaluate as SFT."""
    from engine.fp4 import model_io

    copy_ = model_io.load_model(path, torch.float32, torch.device("cpu"))
    copy_.load_state_dict(model.state_dict(), strict=True)
    return copy_


def quantize(model, tokenizer, fmt: str, recipe, train_rows):
    """The PTQ stage on `model` (a fresh copy): same calibration rows, loop and backend; plus the fast experts path."""
    from engine.fp4 import fast_experts, modelopt_glue
    from engine.stages.ptq import calibration_loop

    cfg = recipe.ptq
    calib = random.Random(cfg.calib_size).sample(train_rows, min(cfg.calib_size, len(train_rows)))
    backend = modelopt_glue.resolve_backend(recipe.hardware.fp4_backend, "cpu")
    quantized = modelopt_glue.quantize(model, fmt, calibration_loop(tokenizer, calib,
                                       recipe.data.max_length), backend, cfg.block_size)
    fast_experts.enable(quantized)
    return quantized


def judge(model, tokenizer, rows, recipe, base_experts=None) -> dict:
    """Pass rate per task (+ 95 % half-width) on the evaluate stage's rows; survival for quantized models."""
    from engine.evaluation import evaluator, survival

    results = evaluator.generate_and_judge(model, tokenizer, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size)
    out: dict = {}
    for task in sorted({r["row"].get("task") or "default" for r in results}):
        passed = [bool(r["verdict"]["passed"]) for r in results if (r["row"].get("task") or "default") == task]
        out[task] = {"pass": sum(passed) / len(passed), "ci95": evaluator.wilson_half_width(sum(passed), len(passed)),
                     "n": len(passed)}
    out["answers"] = [r["completion"].get("raw", "") for r in results]
    if base_experts is not None:
        kept = survival.fine_tune_survival(model, base_experts)
        if kept is not None:
            out["survival"] = {"erased_share": kept["erased_share"], "surviving_delta": kept["surviving_delta"]}
    return out


def base_dir(cache: Path, base: str, shape: str, steps: int) -> Path:
    from engine.data.embedded_model import ensure_tiny_base
    from engine.fp4.mxfp4_release import ensure_mxfp4_base

    ensure = ensure_mxfp4_base if base == "mxfp4" else ensure_tiny_base
    return ensure(cache, steps=steps, shape=SHAPES[shape] or None)


def run_setting(setting: dict, recipe, data: dict, cache: Path) -> dict:
    from engine.evaluation import evaluator
    from engine.fp4 import model_io

    started, times = time.perf_counter(), {}
    path = base_dir(cache, setting["base"], setting["shape"], recipe.model.tiny_pretrain_steps)
    tokenizer = model_io.load_tokenizer(path)
    base_experts = evaluator.load_expert_weights(path)
    model = model_io.load_model(path, torch.float32, torch.device("cpu"))  # as the pipeline: MXFP4 dequantized
    sft_cfg = recipe.sft.model_copy(update={"learning_rate": setting["sft_lr"]})
    sft = train(model, tokenizer, sft_cfg, recipe, data["train"], quantized=False)
    times["sft"] = time.perf_counter() - started
    result = {**setting, "models": {"sft": judge(sft, tokenizer, data["eval"], recipe)}}
    control = train(fresh_copy(sft, path), tokenizer, recipe.qat, recipe, data["train"], quantized=False)
    for fmt in setting["formats"]:
        ptq = quantize(fresh_copy(sft, path), tokenizer, fmt, recipe, data["train"])
        result["models"][f"ptq:{fmt}"] = judge(ptq, tokenizer, data["eval"], recipe, base_experts)
        qat = train(ptq, tokenizer, recipe.qat, recipe, data["train"], quantized=True)
        result["models"][f"qat:{fmt}"] = judge(qat, tokenizer, data["eval"], recipe, base_experts)
        result["models"][f"control:{fmt}"] = judge(quantize(fresh_copy(control, path), tokenizer, fmt, recipe,
                                                            data["train"]),
                                                   tokenizer, data["eval"], recipe, base_experts)
    result["seconds"] = round(time.perf_counter() - started, 1)
    sft_answers = result["models"]["sft"]["answers"]
    for m in result["models"].values():  # how many greedy answers differ from SFT's (0: quantization changed nothing)
        m["answers_changed"] = sum(a != b for a, b in zip(m.pop("answers"), sft_answers))
    return result


def story(models: dict, fmt: str, task: str) -> dict:
    """PTQ's drop from SFT (points), whether the 95 % intervals separate, and the share QAT / control recover."""
    sft, ptq, qat, ctl = (models[k][task] for k in ("sft", f"ptq:{fmt}", f"qat:{fmt}", f"control:{fmt}"))
    drop = 100 * (sft["pass"] - ptq["pass"])
    separate = sft["pass"] - sft["ci95"] > ptq["pass"] + ptq["ci95"]
    recovered = (lambda m: (m["pass"] - ptq["pass"]) / (sft["pass"] - ptq["pass"]) if drop > 0 else float("nan"))
    return {"drop": drop, "separate": separate, "qat_recovers": recovered(qat), "control_recovers": recovered(ctl)}


def print_table(result: dict) -> None:
    models = result["models"]
    tasks = [t for t in models["sft"] if isinstance(models["sft"][t], dict) and t != "survival"]
    print(f"\n### shape {result['shape']}, base {result['base']}, SFT lr {result['sft_lr']:g} "
          f"({result['seconds']:.0f} s)\n")
    print("| model | " + " | ".join(tasks) + " | answers != SFT's | erased share | surviving delta |")
    print("|---|" + "---|" * (len(tasks) + 3))
    for name, m in models.items():
        cells = [f"{100 * m[t]['pass']:.1f} ± {100 * m[t]['ci95']:.1f}" for t in tasks]
        kept = m.get("survival")
        extra = [str(m["answers_changed"])]
        extra += [f"{kept['erased_share']:.2f}", f"{kept['surviving_delta']:.2f}"] if kept else ["", ""]
        print(f"| {name} | " + " | ".join(cells + extra) + " |")
    for fmt in result["formats"]:
        for task in tasks:
            s = story(models, fmt, task)
            print(f"- {fmt} {task}: PTQ drop {s['drop']:+.1f} points (intervals {'separate' if s['separate'] else 'overlap'})"
                  f"; QAT recovers {100 * s['qat_recovers']:.0f} %, control {100 * s['control_recovers']:.0f} %")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("assets/recipes/demo.yaml"),
                        help="the recipe whose SFT / PTQ / QAT / eval settings are used (default: the demo's)")
    parser.add_argument("--shapes", default="e4k2", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--bases", default="mxfp4,bf16", help="comma list of mxfp4 (released in MXFP4) and bf16")
    parser.add_argument("--sft-lrs", default="2e-3", help="comma list of SFT peak learning rates")
    parser.add_argument("--formats", default="mxfp4", help="comma list of FP4 formats for PTQ / QAT / control")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "demo_study_cache",
                        help="where the pre-trained bases are cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="append one JSON line per setting to this file")
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()

    from engine.data.chat_data import load_chat_dataset, split_train_eval
    from engine.runtime.workspace import ASSETS
    from engine.stages.evaluate import pick_examples

    recipe = recipe_of(args.recipe)
    rows = load_chat_dataset(recipe.data.source, root=ASSETS)
    train_rows, eval_rows = split_train_eval(rows, recipe.data.eval_fraction, recipe.data.split_seed)
    data = {"train": train_rows, "eval": pick_examples(eval_rows, recipe.eval.max_examples_per_task)}
    print(f"{len(data['eval'])} held-out conversations; recipe {args.recipe}; torch {torch.__version__}")
    for shape in args.shapes.split(","):
        for lr in (float(x) for x in args.sft_lrs.split(",")):
            for base in args.bases.split(","):  # innermost: the two bases side by side at each lr
                setting = {"shape": shape, "base": base, "sft_lr": lr, "formats": args.formats.split(","),
                           "date": time.strftime("%Y-%m-%d")}
                result = run_setting(setting, recipe, data, args.cache)
                print_table(result)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
