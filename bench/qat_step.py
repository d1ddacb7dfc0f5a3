"""One QAT training step on a gpt-oss-20b-shaped model, side by side in one process: BF16, our engine's QAT path,
and plain modelopt (the anchor). Prints a table (step time, ratio to BF16, tokens/s, peak memory) and writes JSON.

    python bench/qat_step.py --layers 2 --batch 4 --seq 1024 --json out.json [--profile]

Paths:
  bf16             no quantizers (the baseline)
  modelopt:<fmt>   mtq.quantize with modelopt's own CUDA fake-quant kernels (the anchor)
  wrapper:<fmt>    mtq.quantize with our backend (the fused Triton kernel of engine/fp4/triton_kernel.py, bit-exact to modelopt's
                   reference QTensors) inside modelopt's expert wrapper
  engine:<fmt>     what the app trains with: the same quantized model, plus engine/fp4/fast_experts.py (each 3-D expert
                   weight fake-quantized once per forward along the input dim, transformers' grouped_mm experts path)
  param:<fmt>      experiment: no modelopt at all; a torch parametrization fake-quantizes the expert weights
Any path may end in @<attention>/<loss> (default: --attention / --loss): attention eager (transformers' eager, a
[batch, 64, T, T] score tensor per layer) or flex (engine/training/attention.py, compiled flex_attention with the
sinks through the LSE); loss full (the model's own loss over [tokens, vocab] logits) or chunked (TRL's fused LM head,
what SFTTrainer / QATSFTTrainer compute: engine/training/hf_trainer.loss_path). e.g. bf16@eager/full,bf16@flex/chunked
Each step is forward + backward + AdamW step on random tokens; the model is random-init (speed does not depend on
the values). The same optimizer and inputs for every path.

Result: a table on stdout; --json FILE writes the same numbers after every measurement (a run cut short by a time
limit keeps what it measured; kept in docs/results/, summarised with the card and the date in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def split_path(path: str, args) -> tuple[str, str, str]:
    """'engine:mxfp4@flex/chunked' -> ('engine:mxfp4', 'flex', 'chunked'); without '@' the --attention / --loss."""
    quant, _, rest = path.partition("@")
    attn, _, loss = rest.partition("/")
    attn, loss = attn or args.attention, loss or args.loss
    if attn not in ("eager", "flex") or loss not in ("full", "chunked"):
        raise ValueError(f"{path}: attention must be eager or flex, loss full or chunked")
    return quant, attn, loss


def build_model(args, attn: str = "eager"):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_local_experts=args.experts, num_experts_per_tok=args.topk,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (args.layers // 2) + ["sliding_attention"] * (args.layers % 2),
        max_position_embeddings=max(4096, args.seq), architectures=["GptOssForCausalLM"],
    )
    cfg._attn_implementation = "sdpa" if args.sdpa else "eager"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: a 24-layer 20b in fp32 would not fit
    try:
        with torch.device(args.device):
            model = GptOssForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if attn == "flex":
        from engine.training import attention

        attention.use(model, "flex", args.device, log=lambda _: None)
    if getattr(args, "checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prepare(model, path: str, batch):
    from engine.fp4 import torch_backend, modelopt_glue

    if path == "bf16":
        return model
    kind, fmt = path.split(":")
    if kind == "param":
        return add_fake_quant_parametrizations(model, fmt)
    backend = None if kind == "modelopt" else modelopt_glue.resolve_backend("auto", batch.device)
    torch_backend.register()
    model = modelopt_glue.quantize(model, fmt, lambda m: m(input_ids=batch[:1]), backend)
    if kind == "engine":
        from engine.fp4 import fast_experts

        assert fast_experts.enable(model) > 0, "fast experts path not applicable"
    return model


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, kind, block):
        from engine.fp4.torch_backend import nvfp4_global_scale

        scale = nvfp4_global_scale(weight) if kind == "nv" else None
        if not weight.is_cuda:  # the torch ops version, blocks along dim 1 via a transpose (CPU smoke runs)
            from engine.fp4.torch_backend import mxfp4_fake_quant, nvfp4_fake_quant

            t = weight.detach().transpose(1, 2)
            out = mxfp4_fake_quant(t, block) if kind == "mx" else nvfp4_fake_quant(t, block, scale * 2688)
            return out.transpose(1, 2)
        from engine.fp4.triton_kernel import fake_quant_3d

        return fake_quant_3d(weight.detach(), kind, block, scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class FakeQuant(torch.nn.Module):
    def __init__(self, kind: str, block: int):
        super().__init__()
        self.kind, self.block = kind, block

    def forward(self, weight):
        return _STE.apply(weight, self.kind, self.block)


def add_fake_quant_parametrizations(model, fmt: str):
    from torch.nn.utils import parametrize

    kind, block = ("mx", 32) if fmt == "mxfp4" else ("nv", 32 if fmt == "nvfp4" else 16)
    for module in model.modules():
        if type(module).__name__ == "GptOssExperts":
            for name in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(module, name, FakeQuant(kind, block), unsafe=True)
    return model


def step_fn(model, opt, batch, loss_kind: str = "full"):
    if loss_kind == "chunked-ready":  # the fused head is already on this model
        loss_kind = "chunked"
    elif loss_kind == "chunked":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def step():
        if loss_kind == "chunked":
            loss = model(input_ids=batch, labels=batch, fused_lm_head=True).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(path: str, args, batch) -> dict:
    cuda = batch.is_cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant, attn, loss_kind = split_path(path, args)
    model = prepare(build_model(args, attn), quant, batch)
    model_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")  # weights + quantizer state
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    step = step_fn(model, opt, batch, loss_kind)
    for _ in range(args.warmup):
        step()
    _sync()
    setup_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    steady_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")  # + optimizer states
    if cuda:  # steady state: weights, grads and optimizer states exist; what one more step needs on top
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        _sync()
        times.append(time.perf_counter() - start)
    result = {
        "path": path, "step_s": statistics.median(times), "step_s_all": times, "loss": float(loss),
        "tokens_per_s": batch.numel() / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "setup_peak_gib": setup_peak, "model_gib": model_gib, "steady_gib": steady_gib,
    }
    if args.profile and path in args.profile_paths:
        result["profile"] = profile(step)
    del model, opt, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def profile(step, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync()
    rows = []
    for evt in sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]:
        rows.append({"op": evt.key, "calls": evt.count, "cuda_ms": evt.device_time_total / 1000})
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    rows.append({"op": "(CUDA kernels launched)", "calls": kernels, "cuda_ms": 0.0})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--intermediate", type=int, default=2880)
    parser.add_argument("--vocab", type=int, default=201088)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sdpa", action="store_true", help="sdpa attention instead of eager (the recipe uses eager)")
    parser.add_argument("--paths", default="bf16,modelopt:mxfp4,wrapper:mxfp4,engine:mxfp4,modelopt:nvfp4,engine:nvfp4")
    parser.add_argument("--attention", default="eager", choices=("eager", "flex"), help="paths without '@'")
    parser.add_argument("--loss", default="full", choices=("full", "chunked"), help="paths without '@'")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the recipe's default)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-paths", default="engine:mxfp4")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run with tiny dims")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every path in this process (default: one fresh process per path)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    measure_paths(args, argv if argv is not None else sys.argv[1:], [])
    return 0


def measure_paths(args, argv: list[str], results: list[dict]) -> list[dict]:
    """Every path of `args.paths` at args.batch x args.seq, appended to `results` (each row names its batch and
    seq, so one list can hold a context sweep); the table and the JSON follow every measurement."""
    args.profile_paths = args.profile_paths.split(",") if isinstance(args.profile_paths, str) else args.profile_paths
    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    shown = len(results)
    for path in args.paths.split(","):
        if not args.same_process and "," in args.paths:
            # Measured: after a quantized path, the next path in the same process found the previous model's
            # weights (5.2 GiB) still allocated, so every quantized path but the first looked 1.19x heavier.
            # (Cause found later: pulp's import-time exceptions pinned the frames; engine/fp4/import_leaks.py.)
            row = measure_in_subprocess(path, argv)
        else:
            try:
                row = measure(path, args, batch)
            except torch.OutOfMemoryError as exc:
                row = {"path": path, "error": f"out of memory: {str(exc)[:200]}"}
            except Exception as exc:  # noqa: BLE001 - one broken path must not lose the others' numbers
                row = {"path": path, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            gc.collect()  # after an out-of-memory error too: its traceback no longer pins the step's tensors
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append({**row, "batch": args.batch, "seq": args.seq})
        print_table(results[shown:], args)
        write_json(results, args)  # after every measurement: a run cut short by its time limit keeps its rows
    return results


def write_json(results: list[dict], args) -> None:
    if not args.json:
        return
    from importlib.metadata import PackageNotFoundError, version

    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "batch": args.batch, "seq": args.seq, "layers": args.layers, "experts": args.experts,
            "date": time.strftime("%Y-%m-%d")}
    for package in ("transformers", "nvidia-modelopt", "trl"):  # versions without importing modelopt (~28 s cold)
        try:
            meta[package] = version(package)
        except PackageNotFoundError:
            pass
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def measure_in_subprocess(path: str, argv: list[str]) -> dict:
    """One path in a fresh process on the same card (same flags, `--paths path`), its result read back."""
    import subprocess
    import tempfile

    rest, skip = [], False
    for arg in argv:  # drop --paths / --json and their values
        if skip:
            skip = False
        elif arg in ("--paths", "--json"):
            skip = True
        elif not arg.startswith(("--paths=", "--json=")):
            rest.append(arg)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([sys.executable, __file__, *rest, "--paths", path, "--json", out.name, "--same-process"],
                              capture_output=True, text=True)
        try:
            return json.loads(Path(out.name).read_text())["results"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return {"path": path, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"}


def print_table(results: list[dict], args) -> None:
    base = next((r["step_s"] for r in results if r["path"].split("@")[0] == "bf16" and "step_s" in r), None)
    print(f"\n{'path':<26} {'step s':>8} {'x BF16':>7} {'tokens/s':>10} {'peak GiB':>9} {'setup GiB':>9}  "
          f"(batch {args.batch}x{args.seq})")
    for r in results:
        if "error" in r:
            print(f"{r['path']:<26} {r['error']}")
            continue
        ratio = f"{r['step_s'] / base:.2f}" if base else "-"
        print(f"{r['path']:<26} {r['step_s']:8.3f} {ratio:>7} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.1f} "
              f"{r['setup_peak_gib']:9.1f} {r.get('model_gib', float('nan')):6.1f} {r.get('steady_gib', float('nan')):6.1f}")
    for r in results:
        for row in r.get("profile", []):
            print(f"  [{r['path']}] {row['op'][:60]:<60} {row['calls']:>6} {row['cuda_ms']:9.2f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
