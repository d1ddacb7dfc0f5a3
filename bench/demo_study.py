"""Does the embedded demo show what happens to gpt-oss? SFT -> PTQ / QAT / control, over a grid of settings.

For each setting (shape, base, SFT lr, SFT steps, QAT lr, seed), with the engine's own pieces (the SFT stage's
trainer, the PTQ stage's modelopt quantization and calibration, the QAT stage's trainer, the evaluate stage's
generation, pass rule and rows):
  SFT      the demo recipe's SFT (assets/recipes/demo.yaml) at --sft-lrs for --sft-steps, from the base
  PTQ      the SFT model quantized to each --formats (calibrated as the PTQ stage does)
  QAT      PTQ trained on for the recipe's QAT steps at --qat-lrs (modelopt's QAT trainer, as the QAT stage)
  control  the SFT model trained on for the same steps at the same lr in high precision, then PTQ: what the extra
           training alone gives (if it recovers as much as QAT, QAT's gain is not about the quantization); also
           judged before its PTQ (control:unquantized): above SFT means the SFT had not converged
Every model is judged on the same held-out conversations with the same pass rule as the demo's evaluate stage
(the recipe's eval split, `eval.max_examples_per_task` per task, greedy, `eval.max_new_tokens`); only --smoke-eval
(cost estimates and tests) caps it, and its results say SMOKE everywhere. The base is the embedded model released
in MXFP4 (engine/fp4/mxfp4_release.py) or the plain BF16 one (--bases), of the default shape or another (--shapes,
e.g. e16k2 = 16 experts, top-2); it is pre-trained on the CPU once per --cache (the CPU's cache key, on any
--device). --seeds seed the fine-tunes (SFT, QAT, control), not the base.

Settings run in --jobs worker processes (one setting each at a time, from a queue); on --device cuda they share the
GPU in float32 (the CPU demo's numerics; several tiny models share one GPU well, each being launch-bound).

    nice python bench/demo_study.py --bases mxfp4,bf16 --sft-lrs 2e-4,5e-4,1e-3,2e-3 --formats mxfp4
    python bench/demo_study.py --device cuda --jobs 8 --budget-s 520 --shapes e4k2,e16k2 --bases mxfp4 \\
        --sft-lrs 3e-4,1e-3 --sft-steps 900 --qat-lrs 2e-4,5e-5 --formats mxfp4,nvfp4 --json study.jsonl

Result: a table on stdout per setting as it finishes (pass rate per task with 95 % Wilson intervals; PTQ's drop, the
share of it QAT and the control recover; the fine-tune survival of each quantized model), then all tables again and
a summary (one row per setting, format and task, with issue 13's acceptance) sorted by setting; --json FILE appends
one JSON line per setting as it finishes (the parent writes it: a budget stop keeps every finished line). --budget-s
stops the workers at the deadline and reports what finished: the settings cut off are written too, with the models
they had finished and "partial": true. --from-json FILE prints the tables of saved lines.
Recorded, with the date, in docs/demo_study.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # --budget-s counts from here: the process's start, imports included
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.lib import grid, study_report  # noqa: E402

SHAPES = {  # name -> embedded_model.SHAPE overrides
    "e4k2": {},  # today's: 4 experts, top-2, intermediate 128 (experts 39 % of the parameters)
    "e16k2": {"num_local_experts": 16, "num_experts_per_tok": 2},  # experts 72 %, same compute per token
    "e32k4": {"num_local_experts": 32, "num_experts_per_tok": 4, "intermediate_size": 64},  # gpt-oss's routing
}
BASES = ("mxfp4", "bf16")
FORMATS = ("mxfp4", "nvfp4")


def recipe_of(path: Path):
    from engine.recipe.configs import Recipe

    return Recipe.model_validate(yaml.safe_load(path.read_text()))


_TOKENIZED: dict = {}  # TRL's tokenized training set, made by the first trainer and handed to the next ones


def train(model, tokenizer, cfg, recipe, rows, quantized: bool, device: torch.device):
    """The SFT (or, quantized, the QAT) stage's trainer on `model` for cfg.max_steps; no checkpoints, no eval.
    The rows are tokenized once (TRL skips a dataset that already has input_ids): ~40 s a trainer otherwise."""
    from trl import SFTTrainer

    from engine.stages.qat import trainer_class
    from engine.training import hf_trainer

    cfg = cfg.model_copy(update={"save_steps": 10**6, "logging_steps": max(1, cfg.max_steps // 4)})
    # trl_args reads these two: float32 keeps bf16 mixed precision off on CUDA too (the CPU demo's numerics)
    ctx = type("Device", (), {"device": device, "dtype": torch.float32})()
    with tempfile.TemporaryDirectory() as out:
        args = hf_trainer.trl_args(cfg, ctx, Path(out), recipe.data.max_length)
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


def load_base(path: Path, device: torch.device):
    """The base as the pipeline loads it (MXFP4 experts dequantized, float32), read on the CPU and then moved:
    dequantizing an MXFP4 checkpoint is exact, so where it runs cannot change the weights, and the CPU path is the
    one the study's CPU runs used (no dependence on transformers' CUDA MXFP4 kernels)."""
    from engine.fp4 import model_io

    return model_io.load_model(path, torch.float32, torch.device("cpu")).to(device)


def fresh_copy(model, path: Path, device: torch.device):
    """An independent copy of a trained model: the base loaded again with the trained weights.

    Not copy.deepcopy: the Trainer leaves an instance-level `forward` bound to the model it trained (accelerate's
    wrapper), so a deep copy runs the *original* model's modules. Measured: zeroing a deep copy's expert weights
    left its logits unchanged (max |diff| 0.0), which made every copy evaluate as SFT."""
    copy_ = load_base(path, device)
    copy_.load_state_dict(model.state_dict(), strict=True)
    return copy_


def quantize(model, tokenizer, fmt: str, recipe, train_rows, device: torch.device):
    """The PTQ stage on `model` (a fresh copy): same calibration rows, loop and backend; plus the fast experts path."""
    from engine.fp4 import fast_experts, modelopt_glue
    from engine.stages.ptq import calibration_loop

    cfg = recipe.ptq
    calib = random.Random(cfg.calib_size).sample(train_rows, min(cfg.calib_size, len(train_rows)))
    backend = modelopt_glue.resolve_backend(recipe.hardware.fp4_backend, device)  # the engine's choice per device
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
    """The cached base (pre-trained on the CPU if missing): the CPU's cache key on every --device. A cached MXFP4
    release is used on its own (it holds model and tokenizer), so a device call need not carry the BF16 base it
    came from (12.7 MB for both shapes: the device tool carries 64 MiB in all)."""
    from engine.data.embedded_model import ensure_tiny_base
    from engine.fp4.mxfp4_release import ensure_mxfp4_base

    cached = cached_base_dir(cache, base, shape, steps)
    if (cached / "config.json").exists():
        return cached
    ensure = ensure_mxfp4_base if base == "mxfp4" else ensure_tiny_base
    return ensure(cache, steps=steps, shape=SHAPES[shape] or None)


def cached_base_dir(cache: Path, base: str, shape: str, steps: int) -> Path:
    """Where base_dir finds the base in `cache` (the engine's cache keys; CPU-trained, seed 0), without building it."""
    from engine.data.embedded_model import cache_key
    from engine.fp4.mxfp4_release import release_key

    bf16 = Path(cache) / f"tiny-gpt-oss-base-{cache_key(steps, 0, shape=SHAPES[shape] or None)}"
    return bf16 if base == "bf16" else Path(cache) / f"tiny-gpt-oss-mxfp4-{release_key(bf16)}"


def run_setting(setting: dict, ctx: dict) -> dict:
    """SFT, PTQ per format, then the control's and QAT's extra steps, all judged; the result is one JSON line.
    The cheap, telling part (SFT, PTQ) comes first, and after each model the result so far goes to the parent
    (grid.progress): a setting the budget cuts off still reports the models it finished."""
    from engine.evaluation import evaluator
    from engine.fp4 import model_io

    recipe, data, device = ctx["recipe"], ctx["data"], ctx["device"]
    started, times = time.perf_counter(), {}
    path = base_dir(ctx["cache"], setting["base"], setting["shape"], recipe.model.tiny_pretrain_steps)
    tokenizer = model_io.load_tokenizer(path)
    base_experts = evaluator.load_expert_weights(path)
    seed = {"seed": setting["seed"]}
    sft_cfg = recipe.sft.model_copy(update={"learning_rate": setting["sft_lr"], "max_steps": setting["sft_steps"],
                                            **seed})
    more_cfg = recipe.qat.model_copy(update={"learning_rate": setting["qat_lr"], **seed})  # QAT's and the control's
    result = {**setting, "models": {}, "times": times}
    sft_answers: list[str] = []

    def record(name: str, model, experts=None) -> None:
        """Judge `model`, keep how many greedy answers differ from SFT's (0: quantization changed nothing)."""
        judged = judge(model, tokenizer, data["eval"], recipe, experts)
        answers = judged.pop("answers")
        sft_answers[:] = sft_answers or answers
        judged["answers_changed"] = sum(a != b for a, b in zip(answers, sft_answers))
        result["models"][name] = judged
        lap(name)

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - started - sum(times.values()), 1)
        result["seconds"] = round(time.perf_counter() - started, 1)
        grid.progress(result)

    sft = train(load_base(path, device), tokenizer, sft_cfg, recipe, data["train"], quantized=False, device=device)
    lap("sft_train")
    record("sft", sft)
    ptqs = {}
    for fmt in setting["formats"]:
        ptqs[fmt] = quantize(fresh_copy(sft, path, device), tokenizer, fmt, recipe, data["train"], device)
        record(f"ptq:{fmt}", ptqs[fmt], base_experts)
    control = train(fresh_copy(sft, path, device), tokenizer, more_cfg, recipe, data["train"], quantized=False,
                    device=device)
    lap("control_train")
    record("control:unquantized", control)  # ~ SFT's pass rates iff the SFT had converged: the control's premise
    for fmt in setting["formats"]:
        ctl = quantize(fresh_copy(control, path, device), tokenizer, fmt, recipe, data["train"], device)
        record(f"control:{fmt}", ctl, base_experts)
        qat = train(ptqs.pop(fmt), tokenizer, more_cfg, recipe, data["train"], quantized=True, device=device)
        record(f"qat:{fmt}", qat, base_experts)
    return result


def worker_context(index: int, recipe_path: Path, cache: Path, device: str, threads: int, gpus: int,
                   smoke_eval: int | None) -> dict:
    """Once per worker process: threads, device (worker i on GPU i mod gpus), recipe, rows."""
    if device == "cuda" and gpus > 1:  # before this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")  # no TF32 on CUDA: float32 as on the CPU
    import datasets

    datasets.disable_progress_bars()
    from engine.data.chat_data import load_chat_dataset, split_train_eval
    from engine.runtime.workspace import ASSETS
    from engine.stages.evaluate import pick_examples

    recipe = recipe_of(recipe_path)
    rows = load_chat_dataset(recipe.data.source, root=ASSETS)
    train_rows, eval_rows = split_train_eval(rows, recipe.data.eval_fraction, recipe.data.split_seed)
    per_task = smoke_eval or recipe.eval.max_examples_per_task
    return {"recipe": recipe, "data": {"train": train_rows, "eval": pick_examples(eval_rows, per_task)},
            "cache": cache, "device": torch.device(device)}


def comma_list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {kind.__name__}: {e}") from None
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        return values
    return parse


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("assets/recipes/demo.yaml"),
                        help="the recipe whose SFT / PTQ / QAT / eval settings are used (default: the demo's)")
    parser.add_argument("--shapes", type=comma_list(str), default=["e4k2"], help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--bases", type=comma_list(str), default=list(BASES),
                        help="comma list of mxfp4 (released in MXFP4) and bf16")
    parser.add_argument("--sft-lrs", type=comma_list(float), default=[2e-3], help="comma list of SFT peak lrs")
    parser.add_argument("--sft-steps", type=comma_list(int), help="comma list of SFT step counts (default: the recipe's)")
    parser.add_argument("--qat-lrs", type=comma_list(float),
                        help="comma list of QAT peak lrs; the control trains at the same lr (default: the recipe's)")
    parser.add_argument("--seeds", type=comma_list(int), help="comma list of fine-tune seeds (default: the recipe's)")
    parser.add_argument("--formats", type=comma_list(str), default=["mxfp4"], help="comma list of mxfp4, nvfp4")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models train and generate (float32 on both)")
    parser.add_argument("--jobs", type=int, default=1, help="settings run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    parser.add_argument("--budget-s", type=positive,
                        help="stop the workers after this many seconds from the start; report what finished")
    parser.add_argument("--smoke-eval", type=int,
                        help="evaluate only this many held-out rows per task: cost estimates and tests only (results"
                             " are marked SMOKE); the study always uses the recipe's")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "demo_study_cache",
                        help="where the pre-trained bases are cached (tiny-gpt-oss-base-* / tiny-gpt-oss-mxfp4-*)")
    parser.add_argument("--cached-only", action="store_true",
                        help="exit at once (status 2) if a base is not in --cache instead of pre-training it")
    parser.add_argument("--json", type=Path, help="append one JSON line per setting to this file")
    parser.add_argument("--from-json", type=Path, help="print the tables and summary of saved JSON lines; run nothing")
    args = parser.parse_args(argv)
    for name, given, known in (("shapes", args.shapes, SHAPES), ("bases", args.bases, BASES),
                               ("formats", args.formats, FORMATS)):
        if set(given) - set(known):
            parser.error(f"--{name}: unknown {sorted(set(given) - set(known))}; known: {', '.join(known)}")
    for name in ("sft_steps", "jobs", "threads", "smoke_eval"):
        values = getattr(args, name)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    if args.device == "cuda" and not args.from_json and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    return args


def settings_of(args, recipe) -> list[dict]:
    """The grid, in queue order: seeds outermost (a seed's grid finishes before the next seed's starts), then the
    longer SFTs and bigger shapes first (the slowest settings start first, so the queue drains evenly)."""
    out = []
    for seed, steps, shape, lr, qat_lr, base in itertools.product(
            args.seeds or [recipe.sft.seed], sorted(args.sft_steps or [recipe.sft.max_steps], reverse=True),
            sorted(args.shapes, key=list(SHAPES).index, reverse=True), args.sft_lrs, args.qat_lrs or [recipe.qat.learning_rate],
            args.bases):
        out.append({"shape": shape, "base": base, "sft_lr": lr, "sft_steps": steps, "qat_lr": qat_lr, "seed": seed,
                    "formats": args.formats, "smoke_eval": args.smoke_eval, "device": args.device, "date": time.strftime("%Y-%m-%d")})
    return out


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]
        for r in sorted(results, key=study_report.sort_key):
            study_report.print_table(r)
        study_report.print_summary(results)
        return 0
    started = STARTED
    recipe = recipe_of(args.recipe)
    settings = settings_of(args, recipe)
    pairs = sorted({(s["shape"], s["base"]) for s in settings})
    missing = [cached_base_dir(args.cache, b, sh, recipe.model.tiny_pretrain_steps) for sh, b in pairs]
    missing = [str(d) for d in missing if not (d / "config.json").exists()]
    if missing and args.cached_only:
        print(f"--cached-only: not in --cache, would be pre-trained (tens of minutes on a CPU): {', '.join(missing)}",
              file=sys.stderr)
        return 2
    for shape, base in pairs:  # here, once, not in N workers at once
        print(f"base {shape}/{base}: {base_dir(args.cache, base, shape, recipe.model.tiny_pretrain_steps)}")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    print(f"{len(settings)} settings on {args.device} ({gpus} GPUs) in {args.jobs} workers; recipe {args.recipe}; "
          f"torch {torch.__version__}; budget {args.budget_s or 'none'} s", flush=True)

    def write(setting: dict, result: dict) -> None:
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(result) + "\n")
        study_report.print_table(result)

    signal.signal(signal.SIGTERM, interrupt)  # `timeout`'s signal: stop the workers, report what finished
    budget = None if args.budget_s is None else max(0.0, args.budget_s - (time.monotonic() - started))
    outcome = grid.run(settings, run_setting, args.jobs, budget_s=budget, on_result=write,
                       init=worker_context, init_args=(args.recipe, args.cache, args.device, args.threads, gpus,
                                                       args.smoke_eval),
                       log=lambda m: print(m, flush=True))
    partial = [{**r, "partial": True} for _, r in outcome.partial if r["models"]]  # cut off: the models it finished
    for r in partial:
        write(r, r)
    results = [r for _, r in outcome.done]
    print(f"\n## {len(results)} of {len(settings)} settings finished in {time.monotonic() - started:.0f} s"
          f"{' (time budget reached)' if outcome.out_of_budget else ''}{' (interrupted)' if outcome.interrupted else ''}"
          f"; {len(outcome.failed)} failed")
    for name, rows in (("stopped while running", outcome.running), ("not started", outcome.not_started),
                       ("failed", [s for s, _ in outcome.failed])):
        for s in rows:
            print(f"- {name}: {study_report.label(s)}")
    for r in sorted(results + partial, key=study_report.sort_key):
        study_report.print_table(r)
    if results or partial:
        study_report.print_summary(results + partial)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
