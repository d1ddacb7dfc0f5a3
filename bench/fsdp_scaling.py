"""SFT and QAT steps of a gpt-oss-20b-shaped model under FSDP2 on 1 and 2 GPUs, launched the way the engine launches
training: `accelerate launch` with the accelerate config that engine/runtime/distributed.py writes for `strategy: fsdp2`.

    python bench/fsdp_scaling.py --runs 2x1,2x2,6x1,6x2 --json out.json      # LAYERSxGPUS

Each run is one `accelerate launch` of this file (`--rank-main`). Inside it, two phases on a fresh model each:
  sft   the bf16-built model, prepared by accelerate (FSDP2 upcasts it to fp32 master weights, computes in bf16)
  qat   the same model with modelopt's MXFP4 weight-only quantizers (engine/fp4/modelopt_glue.py) and the engine's fast experts
        path (engine/fp4/fast_experts.py), prepared the same way
Each phase: fused AdamW, per-GPU batch x seq random tokens, warm-up steps, then the median of timed steps. Reported per
run: step time, tokens/s over all GPUs, peak memory on the busiest GPU (setup included: what decides whether it fits),
and engine/training/estimate.py's prediction for the same model, strategy and GPU count. Scaling efficiency =
tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU), same model, same per-GPU batch.
A run that does not fit ends with "out of memory" in its phase; that is a result, not a failure of the benchmark.

Result: a table on stdout; --json FILE writes every run's numbers (kept in docs/results/, summarised with the
card and the date in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_config(layers: int, vocab: int) -> dict:
    """gpt-oss-20b's shape with fewer layers (the config keys engine/training/estimate.py reads)."""
    from engine.training.estimate import KNOWN

    layer_types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    return {**KNOWN["gpt-oss-20b"], "num_hidden_layers": layers, "vocab_size": vocab, "layer_types": layer_types,
            "sliding_window": 128, "max_position_embeddings": 4096, "architectures": ["GptOssForCausalLM"]}


# ------------------------------------------------------------------------------------------ inside the ranks


def build_model(cfg: dict, device):
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**cfg)
    config._attn_implementation = "eager"  # what the app trains with (attention sinks)
    torch.manual_seed(0)
    with torch.device(device):
        return GptOssForCausalLM(config).to(torch.bfloat16)


def run_phase(accelerator, phase: str, cfg: dict, args) -> dict:
    import torch

    from engine.fp4 import fast_experts, modelopt_glue

    device = accelerator.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    where = "build"
    try:
        model = build_model(cfg, device)
        if phase == "qat":
            where = "quantize"
            backend = modelopt_glue.resolve_backend("auto", device)
            model = modelopt_glue.quantize(model, "mxfp4", None, backend)  # MXFP4 is dynamic: nothing to calibrate
            assert fast_experts.enable(model) == cfg["num_hidden_layers"], "fast experts path not applied"
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        where = "prepare"
        model, opt = accelerator.prepare(model, opt)
        gen = torch.Generator(device=device).manual_seed(1 + accelerator.process_index)
        batch = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device=device, generator=gen)
        times, loss = [], None
        for i in range(args.warmup + args.steps):
            where = f"step {i + 1}"
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        result = {"phase": phase, "step_s": step, "loss": float(loss.detach()),
                  "tokens_per_s": args.batch * args.seq * accelerator.num_processes / step}
    except torch.OutOfMemoryError as exc:
        result = {"phase": phase, "error": f"out of memory at {where}: {str(exc).splitlines()[0][:160]}"}
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
    result["peak_gib"] = float(accelerator.gather(peak).max())
    model = opt = None  # noqa: F841 - drop every reference before the next phase builds its model
    accelerator.free_memory()
    return result


def rank_main(args) -> int:
    from accelerate import Accelerator

    accelerator = Accelerator()
    assert accelerator.distributed_type.name == "FSDP", f"expected an FSDP launch, got {accelerator.distributed_type}"
    cfg = model_config(args.layers, args.vocab)
    results = []
    for phase in args.phases.split(","):
        results.append(run_phase(accelerator, phase, cfg, args))
        if "error" in results[-1]:
            break  # a model that does not fit for SFT does not fit for QAT either
    if accelerator.is_main_process:
        Path(args.result).write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


# ------------------------------------------------------------------------------------------ the orchestrator


def accelerate_config_file(gpus: int, tmp: Path) -> Path:
    """The file the engine writes for a `strategy: fsdp2` recipe with `gpus` processes (engine/runtime/distributed.py)."""
    from engine.runtime import distributed
    from engine.recipe.configs import HardwareConfig, TrainConfig

    # The engine refuses FSDP2 on one process (pointless in a product); here it is the 1-GPU baseline of the same code.
    hw = HardwareConfig(strategy="fsdp2", num_processes=2, device="cuda")
    config = {**distributed.accelerate_config(hw, TrainConfig(), on_cuda=True, bf16=True), "num_processes": gpus}
    return distributed.write_config(config, tmp / f"fsdp2-{gpus}.yaml")


def launch(layers: int, gpus: int, args, tmp: Path) -> dict:
    from engine.training.estimate import estimate

    result_file = tmp / f"result-{layers}x{gpus}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_file(gpus, tmp)),
           "--num_processes", str(gpus), __file__, "--rank-main", "--layers", str(layers), "--result", str(result_file),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--vocab", str(args.vocab), "--phases", args.phases]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-1500:]
        rc = proc.returncode
    except subprocess.TimeoutExpired as exc:
        tail, rc = str(exc.stderr or "")[-1500:], "timeout"
    phases = json.loads(result_file.read_text()) if result_file.exists() else []
    cfg = model_config(layers, args.vocab)
    est = estimate(cfg, method="full", gpus=gpus, strategy="fsdp2", batch=args.batch, seq=args.seq,
                   gradient_checkpointing=False)
    run = {"layers": layers, "gpus": gpus, "params_b": est["parameters"] / 1e9, "phases": phases,
           "estimate_gib": est["per_gpu_gib"]["total"], "estimate": est["per_gpu_gib"], "verdict": est["verdict"],
           "rc": rc, "wall_s": time.time() - start}
    if rc != 0 or not phases:
        run["log_tail"] = tail
    return run


def print_table(runs: list[dict], args) -> None:
    one_gpu = {(r["layers"], p["phase"]): p["tokens_per_s"] for r in runs if r["gpus"] == 1
               for p in r["phases"] if "tokens_per_s" in p}
    print(f"\nFSDP2, per-GPU batch {args.batch} x {args.seq}, gpt-oss-20b shape (32 experts, hidden 2880)")
    print(f"{'layers':>6} {'params':>7} {'GPUs':>4} {'phase':>5} {'step s':>7} {'tokens/s':>9} {'scaling':>7} "
          f"{'peak GiB':>8} {'est GiB':>7}")
    for r in runs:
        rows = r["phases"] or [{"phase": "-", "error": f"no result (exit {r['rc']})"}]
        for p in rows:
            if "error" in p:
                detail = p["error"][:70]
                print(f"{r['layers']:>6} {r['params_b']:6.1f}B {r['gpus']:>4} {p['phase']:>5} {detail}  "
                      f"(peak {p.get('peak_gib', float('nan')):.1f}, est {r['estimate_gib']:.1f} GiB)")
                continue
            base = one_gpu.get((r["layers"], p["phase"]))
            eff = p["tokens_per_s"] / (r["gpus"] * base) if base and r["gpus"] > 1 else None
            print(f"{r['layers']:>6} {r['params_b']:6.1f}B {r['gpus']:>4} {p['phase']:>5} {p['step_s']:7.3f} "
                  f"{p['tokens_per_s']:9.0f} {f'{eff:.2f}' if eff else '-':>7} {p['peak_gib']:8.1f} "
                  f"{r['estimate_gib']:7.1f}")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="2x1,2x2,6x1,6x2", help="comma-separated LAYERSxGPUS")
    parser.add_argument("--phases", default="sft,qat")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=201088)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per launch")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_main:
        return rank_main(args)

    import torch

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            layers, gpus = map(int, spec.split("x"))
            if gpus > torch.cuda.device_count():
                runs.append({"layers": layers, "gpus": gpus, "params_b": float("nan"), "phases": [], "rc": "skipped",
                             "estimate_gib": float("nan"), "log_tail": f"only {torch.cuda.device_count()} GPUs here"})
                continue
            runs.append(launch(layers, gpus, args, Path(tmp)))
            print_table(runs, args)
            for r in runs[-1:]:
                if "log_tail" in r:
                    print(f"--- {r['layers']}x{r['gpus']} exit {r['rc']}:\n{r['log_tail']}")
    meta = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "seq": args.seq}
    try:
        import accelerate
        import modelopt
        import transformers

        meta.update(accelerate=accelerate.__version__, transformers=transformers.__version__,
                    modelopt=modelopt.__version__)
    except ImportError:
        pass
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
