"""Long context: eager attention + full-logits loss against flex attention + chunked loss, BF16 and QAT.

    python bench/long_context.py sweep --seq 4096,16384,65536,1024 --tokens 16384 --json out.json
    python bench/long_context.py max-context --seqs 16384,32768,65536,98304,131072 --json out.json

sweep        the context lengths T of --seq (one or several, in one process: imports and compiles happen once),
             batch = tokens / T (at least 1: equal tokens per step where T allows), the 2-layer gpt-oss-20b cut of
             bench/qat_step.py with gradient checkpointing (the recipe's default), four paths side by side: bf16
             and engine:mxfp4 (the engine's fast experts QAT path), each @eager/full and @flex/chunked. Prints step
             time, tokens/s and peak memory; a path that runs out of memory says so.
max-context  the full 24-layer gpt-oss-20b shape, random init built in bf16 on the GPU, MXFP4 fake-quantized by
             the engine (our backend + fast experts), peft LoRA r=8 on the attention projections (the engine's
             lora.add_adapters), gradient checkpointing, flex attention + chunked loss, AdamW on the adapters. Two
             warm-up steps at 1k and 2k tokens compile flex (static shapes, then dynamic ones: later lengths compile
             nothing), then one training step at batch 1 for each T in ascending order, in one process (the model is
             built once), up to the first T that runs out of memory, then --bisect halvings (multiples of 4096)
             between the last T that ran and the first that did not. Prints T, step time, peak memory and the
             estimator's prediction for the same run (engine/training/estimate.py).
Result: tables on stdout; --json FILE writes the numbers after every measurement (a run cut short by its time limit
keeps what it measured; summarised with the card and the date in docs/benchmarks.md). On CPU (--device cpu) both
modes run at tiny sizes as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SWEEP_PATHS = "bf16@eager/full,bf16@flex/chunked,engine:mxfp4@eager/full,engine:mxfp4@flex/chunked"
TINY = ["--layers", "2", "--experts", "4", "--topk", "2", "--hidden", "128", "--intermediate", "128", "--vocab", "512"]


def sweep(args) -> list[dict]:
    """bench/qat_step.py's measurement for the four paths at each T, in this process (imports and compiles once);
    one JSON for all of them, rewritten after every measurement."""
    import qat_step

    results = []
    for seq in (int(t) for t in args.seq.split(",")):
        batch = max(1, args.tokens // seq)
        argv = ["--seq", str(seq), "--batch", str(batch), "--steps", str(args.steps), "--warmup", "1",
                "--paths", args.paths, "--device", args.device, "--checkpointing", "--same-process"]
        if args.device == "cpu":
            argv += TINY
        if args.json:
            argv += ["--json", args.json]
        qat_step.measure_paths(qat_step.build_parser().parse_args(argv), argv, results)
    return results


def build_lora_qat_model(args, seq: int):
    """The 24-layer gpt-oss-20b shape (2 tiny layers on CPU) in bf16 on the device, MXFP4 fake-quantized on the
    engine's fast experts path, LoRA r=8 on the attention projections, flex attention, gradient checkpointing."""
    import qat_step

    from engine.recipe.configs import TrainConfig
    from engine.training import lora

    shape = ["--layers", "24", "--seq", str(seq), "--device", args.device, "--checkpointing"]
    qargs = qat_step.build_parser().parse_args(shape + ([] if args.device == "cuda" else TINY))
    torch.manual_seed(0)
    model = qat_step.build_model(qargs, "flex")
    calib = torch.randint(0, qargs.vocab, (1, 256), device=args.device)
    model = qat_step.prepare(model, "engine:mxfp4", calib)
    lora.add_adapters(model, TrainConfig(lora=True, lora_r=8, lora_alpha=16, gradient_checkpointing=True),
                      log=lambda _: None)
    model.train()
    return model, qargs.vocab


def one_step(model, opt, vocab: int, seq: int, args, first: bool) -> dict:
    """One LoRA QAT training step at batch 1 x `seq` random tokens: seconds, tokens/s, peak GiB, or the error."""
    import qat_step

    cuda = args.device == "cuda"
    tokens = torch.randint(0, vocab, (1, seq), device=args.device)
    step = qat_step.step_fn(model, opt, tokens, "chunked" if first else "chunked-ready")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start, error = time.perf_counter(), None
    try:
        loss = step().item()
        qat_step._sync()
    except torch.OutOfMemoryError as exc:
        error = f"out of memory: {str(exc)[:200]}"
    took = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)  # a step cut short by OOM leaves some gradients behind
    del tokens, step
    if error:  # outside the except block: its traceback no longer pins the step's tensors
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return {"seq": seq, "ok": False, "error": error}
    return {"seq": seq, "ok": True, "step_s": took, "tokens_per_s": seq / took, "loss": loss,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def predicted_gib(seq: int) -> float:
    """The estimator's GiB for the same run (its CUDA-context overhead left out: the allocator's peak has none)."""
    from engine.training.estimate import KNOWN, OVERHEAD_GIB, estimate

    r = estimate(KNOWN["gpt-oss-20b"], "lora", 1, "single", batch=1, seq=seq, gpu_memory_gib=141, lora_r=8,
                 attention="flex", chunked_loss=True, gradient_checkpointing=True)
    return round(r["per_gpu_gib"]["total"] - OVERHEAD_GIB, 1)


def max_context(args) -> list[dict]:
    """Warm-ups, then ascending T in one process (the model is built once) up to the first T that runs out of
    memory, then bisection; every row goes to the JSON as soon as it is measured."""
    seqs = [int(s) for s in args.seqs.split(",")]
    started = time.perf_counter()
    model, vocab = build_lora_qat_model(args, max(seqs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=args.device == "cuda")
    args.meta["ready_s"] = round(time.perf_counter() - started, 1)
    print(f"model ready in {args.meta['ready_s']} s", flush=True)
    rows = []

    def run(seq: int, **extra) -> dict:
        row = {**one_step(model, opt, vocab, seq, args, first=not rows), **extra}
        if args.device == "cuda":
            row["predicted_gib"] = predicted_gib(seq)
        rows.append(row)
        write_json(rows, args)
        print(f"T={seq:>7}{' (warm-up)' if extra else ''}: " + (
            f"{row['step_s']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, peak {row['peak_gib']:.1f} GiB"
            if row["ok"] else row["error"]) + (f"  (estimate {row['predicted_gib']} GiB)" if "predicted_gib" in row
                                               else ""), flush=True)
        return row

    for seq in args.warmup:  # compiles flex: static shapes, then dynamic ones
        run(seq, warmup=True)
    good, bad = 0, None
    for seq in seqs:
        if not run(seq)["ok"]:
            bad = seq
            break
        good = seq
    for _ in range(args.bisect if bad else 0):
        middle = (good + bad) // 2 // 4096 * 4096
        if middle <= good:
            break
        good, bad = (middle, bad) if run(middle)["ok"] else (good, middle)
    print(f"longest context for one LoRA QAT step (gpt-oss-20b shape, 24 layers, flex + chunked loss): {good}"
          + (f" (out of memory at {bad})" if bad else " (every length ran)"))
    return rows


def write_json(rows: list[dict], args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": args.meta, "results": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("sweep", "max-context"))
    parser.add_argument("--seq", default="4096", help="sweep: the context length(s) T, comma-separated")
    parser.add_argument("--tokens", type=int, default=16384, help="sweep: tokens per step (batch = tokens / T)")
    parser.add_argument("--paths", default=SWEEP_PATHS, help="sweep: bench/qat_step.py paths")
    parser.add_argument("--seqs", default="16384,32768,65536,98304,131072", help="max-context: T values to try")
    parser.add_argument("--warmup", default="1024,2048", help="max-context: warm-up lengths (they compile flex)")
    parser.add_argument("--bisect", type=int, default=2, help="max-context: halvings between the last T that ran "
                        "and the first that did not")
    parser.add_argument("--steps", type=int, default=2, help="sweep: timed steps per path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "sweep":
        sweep(args)
        return 0
    args.warmup = [int(t) for t in args.warmup.split(",") if t]
    args.meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "shape": "gpt-oss-20b, 24 layers" if args.device == "cuda" else "tiny",
                 "run": "LoRA r=8 QAT (MXFP4, engine fast experts), flex attention, chunked loss, checkpointing"}
    max_context(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
