"""Long context: eager attention + full-logits loss against flex attention + chunked loss, BF16 and QAT.

    python bench/long_context.py sweep --seq 4096 --tokens 16384 --json out.json
    python bench/long_context.py max-context --seqs 16384,32768,65536,98304,131072 --json out.json

sweep        one context length T per call (device.sh runs T = 1k, 4k, 16k, 64k as separate steps, each within a few
             minutes), batch = tokens / T (at least 1: equal tokens per step where T allows), the 2-layer
             gpt-oss-20b cut of bench/qat_step.py with gradient checkpointing (the recipe's default), four paths side
             by side: bf16 and engine:mxfp4 (the engine's fast experts QAT path), each @eager/full and @flex/chunked.
             Prints step time, tokens/s and peak memory; a path that runs out of memory says so.
max-context  the full 24-layer gpt-oss-20b shape, random init built in bf16 on the GPU, MXFP4 fake-quantized by
             the engine (our backend + fast experts), peft LoRA r=8 on the attention projections (the engine's
             lora.add_adapters), gradient checkpointing, flex attention + chunked loss, AdamW on the adapters: one
             training step at batch 1 for each T in ascending order, in one process (the model is built once), up to the
             first T that runs out of memory. Prints T, step time (after one step that compiles), peak memory.
Result: tables on stdout; --json FILE writes the numbers (summarised with the card and the date in
docs/benchmarks.md). On CPU (--device cpu) both modes run at tiny sizes as a smoke test.
"""

from __future__ import annotations

import argparse
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


def sweep(args) -> dict:
    """bench/qat_step.py's measurement for the four paths at one T, in this process (imports and compiles once)."""
    import qat_step

    batch = max(1, args.tokens // args.seq)
    argv = ["--seq", str(args.seq), "--batch", str(batch), "--steps", str(args.steps), "--warmup", "1",
            "--paths", args.paths, "--device", args.device, "--checkpointing", "--same-process"]
    if args.device == "cpu":
        argv += TINY
    if args.json:
        argv += ["--json", args.json]
    return qat_step.main(argv)


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


def max_context(args) -> list[dict]:
    """Ascending T in one process (the model is built once); stops at the first T that runs out of memory."""
    import qat_step

    cuda = args.device == "cuda"
    seqs = [int(s) for s in args.seqs.split(",")]
    model, vocab = build_lora_qat_model(args, max(seqs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    results = []
    for seq in seqs:
        tokens = torch.randint(0, vocab, (1, seq), device=args.device)
        step = qat_step.step_fn(model, opt, tokens, "chunked" if not results else "chunked-ready")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step()  # compiles flex for this shape
            qat_step._sync()
            start = time.perf_counter()
            loss = step()
            qat_step._sync()
            took = time.perf_counter() - start
            r = {"seq": seq, "ok": True, "step_s": took, "tokens_per_s": seq / took, "loss": float(loss),
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}
        except torch.OutOfMemoryError as exc:
            r = {"seq": seq, "ok": False, "error": f"out of memory: {str(exc)[:200]}"}
        del tokens, step
        results.append(r)
        print(f"T={seq:>7}: " + (f"{r['step_s']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak "
                                  f"{r['peak_gib']:.1f} GiB" if r["ok"] else r["error"]), flush=True)
        if not r["ok"]:
            break
    longest = max((r["seq"] for r in results if r["ok"]), default=0)
    print(f"longest context for one LoRA QAT step (gpt-oss-20b shape, 24 layers, flex + chunked loss): {longest}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("sweep", "max-context"))
    parser.add_argument("--seq", type=int, default=4096, help="sweep: the context length T")
    parser.add_argument("--tokens", type=int, default=16384, help="sweep: tokens per step (batch = tokens / T)")
    parser.add_argument("--paths", default=SWEEP_PATHS, help="sweep: bench/qat_step.py paths")
    parser.add_argument("--seqs", default="16384,32768,65536,98304,131072", help="max-context: T values to try")
    parser.add_argument("--steps", type=int, default=2, help="sweep: timed steps per path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "sweep":
        return sweep(args)
    results = max_context(args)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "shape": "gpt-oss-20b, 24 layers" if args.device == "cuda" else "tiny"}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
