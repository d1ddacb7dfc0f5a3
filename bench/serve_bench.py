#!/usr/bin/env python3
"""Serving benchmark: time to first token and tokens/s of an MXFP4 gpt-oss-shaped checkpoint, per backend.

    python bench/serve_bench.py                                   tiny shape, CPU (how the tests run it)
    python bench/serve_bench.py --layers 24 --experts 32 --hidden 2880 --intermediate 2880 --heads 64 \
        --kv-heads 8 --head-dim 64 --vocab 201088 --requests 16 --max-tokens 256 --json bench.json
                                                                  gpt-oss-20b's shape, on a GPU machine

The checkpoint is random (weights do not matter for speed) and written straight in OpenAI's MXFP4 layout (uint8
E2M1 blocks + E8M0 scales; engine/fp4/export_mxfp4.py documents it), so a 20B shape needs no 80 GB fp32 model first.
Its tokenizer is the embedded one (harmony template). Each backend (transformers, plus vLLM when importable, or
--backends) is started with engine.serving.server_process, timed until /health, warmed up, then sent N requests on
/v1/completions with a harmony-rendered prompt (vLLM's gpt-oss *chat* path needs the o200k vocabulary) through
engine.serving.chat.ChatClient, every reply forced to exactly --max-tokens tokens (min_new_tokens / ignore_eos) so
backends generate the same amount. TTFT and tokens/s are measured client side (see engine/serving/chat.py).

Result: a table on stdout and JSON (--json, default WORKDIR/serve_bench.json), summarised in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.data import harmony  # noqa: E402
from engine.serving import server_process  # noqa: E402
from engine.serving.chat import ChatClient  # noqa: E402
from engine.runtime import telemetry  # noqa: E402
from engine.serving.formats import gpu_summary  # noqa: E402

FILLER = ("the quick brown fox jumps over the lazy dog while seven small birds sing about rivers mountains and "
          "green gardens in the morning light").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("model shape (gpt-oss-20b: 24 layers, 32 experts, hidden/intermediate 2880, "
                                 "64 heads, 8 kv heads, head dim 64, vocab 201088)")
    shape.add_argument("--layers", type=int, default=2)
    shape.add_argument("--experts", type=int, default=4)
    shape.add_argument("--top-k", type=int, default=2)
    shape.add_argument("--hidden", type=int, default=128)
    shape.add_argument("--intermediate", type=int, default=128)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--head-dim", type=int, default=32)
    shape.add_argument("--vocab", type=int, default=2048, help="at least the tokenizer's size (rounded up to it)")
    run = p.add_argument_group("run")
    run.add_argument("--backends", default=None, help="comma list; default transformers (+ vllm when importable)")
    run.add_argument("--requests", type=int, default=8)
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--concurrency", type=int, default=1)
    run.add_argument("--max-tokens", type=int, default=64)
    run.add_argument("--prompt-words", type=int, default=48)
    run.add_argument("--device", default="auto", help="transformers backend: auto | cpu | cuda:0")
    run.add_argument("--max-model-len", type=int, default=4096, help="vLLM's KV cache length")
    run.add_argument("--model-dir", default=None, help="benchmark this MXFP4 checkpoint instead of a random one")
    run.add_argument("--workdir", default=None, help="workspace for the servers' rows and logs (default: a temp dir)")
    run.add_argument("--json", default=None, help="write the results here (default: WORKDIR/serve_bench.json)")
    run.add_argument("--start-timeout", type=float, default=1800)
    run.add_argument("--chat", action="store_true",
                     help="also send one chat turn (the server's chat endpoint) and record the answer")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the checkpoint


def make_random_mxfp4(args, out_dir: Path) -> Path:
    """A gpt-oss-shaped MXFP4 checkpoint with random weights, in OpenAI's layout, loadable by transformers/vLLM."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from engine.data import embedded_model
    from engine.fp4.export_mxfp4 import MODULES_TO_NOT_CONVERT, save_tensors

    for name, size in (("hidden", args.hidden), ("intermediate", args.intermediate)):
        if size % 32:
            raise SystemExit(f"--{name} must be a multiple of the MXFP4 block (32), got {size}")
    tokenizer = embedded_model.load_tokenizer()
    config = GptOssConfig(
        vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim, sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)],
        max_position_embeddings=embedded_model.MAX_POSITIONS, tie_word_embeddings=False, architectures=["GptOssForCausalLM"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GptOssForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors.update(_random_mxfp4_expert(name, shape, generator))
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out_dir)
    config.dtype = torch.bfloat16
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    config.save_pretrained(out_dir)
    embedded_model.generation_config().save_pretrained(out_dir)
    embedded_model.save_tokenizer(tokenizer, out_dir)
    return out_dir


def _random_mxfp4_expert(name: str, shape: tuple, generator: torch.Generator) -> dict:
    """transformers' (E, in, out) parameter as OpenAI's (E, out, in/32, 16) uint8 codes + (E, out, in/32) scales.
    Scales near 2^-8 give weights of ~0.02 like the other tensors (E2M1 magnitudes go up to 6)."""
    experts, fan_in, fan_out = shape
    blocks = torch.randint(0, 256, (experts, fan_out, fan_in // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(118, 122, (experts, fan_out, fan_in // 32), generator=generator, dtype=torch.uint8)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


# ------------------------------------------------------------------------------------------------ measuring


def prompt_text(words: int) -> str:
    text = " ".join(FILLER[i % len(FILLER)] for i in range(words))
    return harmony.render([{"role": "user", "content": text}], add_generation_prompt=True)


def fixed_length(backend: str, tokens: int, model_dir: Path) -> dict:
    """Request fields that make every reply exactly `tokens` long (a random model may hit EOS at any step)."""
    if backend == "vllm":
        return {"ignore_eos": True, "min_tokens": tokens}
    generation = json.loads((model_dir / "generation_config.json").read_text())
    config = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
              "eos_token_id": generation.get("eos_token_id"), "pad_token_id": generation.get("pad_token_id")}
    return {"generation_config": json.dumps(config)}


def measure(client: ChatClient, prompt: str, args, extra: dict) -> dict:
    result = None
    for event in client.stream_text(prompt, max_tokens=args.max_tokens, extra_body=extra):
        result = event.result if event.kind == "done" else result
    s = result.stats
    return {"ttft_s": s.ttft_s, "decode_tokens_per_s": s.decode_tokens_per_s, "e2e_tokens_per_s": s.e2e_tokens_per_s,
            "tokens": s.tokens, "total_s": s.total_s, "token_source": s.token_source}


def summarize(samples: list[dict], key: str) -> dict:
    values = sorted(v[key] for v in samples if v[key] is not None)
    if not values:
        return {"mean": None, "p50": None, "p90": None}
    return {"mean": statistics.fmean(values), "p50": values[len(values) // 2],
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))]}


class GpuMemoryPeak(threading.Thread):
    """The most GPU memory in use (NVML, every GPU summed, GiB) while a server loads and answers: the server is another
    process, so torch's own counters in this one cannot see it. Includes the CUDA context and the KV cache the server
    reserves; it is what a smaller card would have to hold."""

    def __init__(self, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.every_s, self.peak_gib, self._done = every_s, None, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            used = [g["mem_used_gb"] for g in telemetry.gpus()[0] if g.get("mem_used_gb") is not None]
            if used:
                self.peak_gib = max(self.peak_gib or 0.0, sum(used))
            self._done.wait(self.every_s)

    def stop(self) -> float | None:
        self._done.set()
        self.join()
        return self.peak_gib


def chat_answer(client: ChatClient, max_tokens: int) -> dict:
    """One chat turn through the server's chat endpoint, as the Chat tab sends it (weights are random here: the
    words mean nothing, what is checked is that the served checkpoint answers a chat)."""
    result = client.chat([{"role": "user", "content": "Say hello in one short sentence."}], max_tokens=max_tokens)
    return {"final": result.final, "analysis": result.analysis, "error": result.error,
            "tokens": result.stats.tokens if result.stats else None}


def bench_backend(store, backend: str, model_dir: Path, args) -> dict:
    options = {"device": args.device} if backend == "transformers" else \
        {"max_model_len": args.max_model_len} if backend == "vllm" else None
    memory = GpuMemoryPeak()
    memory.start()
    started = time.perf_counter()
    try:
        row = server_process.start_server(store, model_dir, backend, options=options, timeout=args.start_timeout)
    except BaseException:
        memory.stop()
        raise
    load_s = time.perf_counter() - started
    try:
        client = ChatClient(row["base_url"], backend=backend)
        chat = chat_answer(client, args.max_tokens) if args.chat else None
        prompt, extra = prompt_text(args.prompt_words), fixed_length(backend, args.max_tokens, model_dir)
        for _ in range(args.warmup):
            measure(client, prompt, args, extra)
        wall = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            samples = list(pool.map(lambda _: measure(client, prompt, args, extra), range(args.requests)))
        wall = time.perf_counter() - wall
    finally:
        server_process.stop_server(store, row["id"])
        peak_gb = memory.stop()
    return {"backend": backend, "command": row["command"], "load_s": load_s, "requests": len(samples),
            "gpu_mem_peak_gib": peak_gb, "chat": chat,
            "concurrency": args.concurrency, "wall_s": wall,
            "throughput_tokens_per_s": sum(s["tokens"] for s in samples) / wall,
            **{k: summarize(samples, k) for k in ("ttft_s", "decode_tokens_per_s", "e2e_tokens_per_s", "tokens")},
            "token_source": samples[0]["token_source"], "samples": samples}


def checkpoint_shape(model_dir: Path) -> dict:
    """The served model's shape, read from its config.json (so --model-dir runs record what was really served)."""
    c = json.loads((model_dir / "config.json").read_text())
    keys = {"layers": "num_hidden_layers", "experts": "num_local_experts", "top_k": "num_experts_per_tok",
            "hidden": "hidden_size", "intermediate": "intermediate_size", "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}
    return {k: c.get(v) for k, v in keys.items()}


def print_table(results: list[dict]) -> None:
    header = f"{'backend':<13}{'load s':>8}{'TTFT p50':>10}{'TTFT p90':>10}{'decode tok/s':>14}{'e2e tok/s':>11}" \
             f"{'tokens':>8}{'agg tok/s':>11}{'GPU GiB':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['backend']:<13}{r['load_s']:>8.1f}{fmt(r['ttft_s']['p50'], '>10.3f')}"
              f"{fmt(r['ttft_s']['p90'], '>10.3f')}{fmt(r['decode_tokens_per_s']['mean'], '>14.1f')}"
              f"{fmt(r['e2e_tokens_per_s']['mean'], '>11.1f')}{fmt(r['tokens']['mean'], '>8.0f')}"
              f"{r['throughput_tokens_per_s']:>11.1f}{fmt(r['gpu_mem_peak_gib'], '>8.1f')}")
        if r.get("chat"):
            chat = r["chat"]
            said = chat["error"] or chat["final"] or chat["analysis"] or "(no text in a harmony channel)"
            print(f"  chat answer ({chat['tokens']} tokens): {said!r:.200}")


def main(argv=None) -> int:
    from storage import Store

    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else make_random_mxfp4(args, workdir / "model-mxfp4")
    backends = args.backends.split(",") if args.backends else \
        ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    store = Store(workdir / "studio.db")
    print(f"checkpoint {model_dir} · {gpu_summary()} · backends {', '.join(backends)}", flush=True)
    results = []
    for backend in backends:
        try:
            results.append(bench_backend(store, backend, model_dir, args))
        except server_process.ServingError as exc:
            print(f"{backend}: not measured: {exc}", file=sys.stderr)
    print_table(results)
    out = Path(args.json or workdir / "serve_bench.json")
    shape = checkpoint_shape(model_dir)
    out.write_text(json.dumps({"shape": shape, "model_dir": str(model_dir), "gpus": gpu_summary(),
                               "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                               "results": results}, indent=2))
    print(f"wrote {out}")
    return 0 if len(results) == len(backends) else 1


if __name__ == "__main__":
    sys.exit(main())
