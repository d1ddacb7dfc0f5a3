"""Write a random-weight checkpoint with openai/gpt-oss-20b's exact shape and layout, tensor by tensor.

No gpt-oss weights can be downloaded on the machines we are lent, and carrying 13 GB to them is not possible; this
generates the same files on the spot:
  - config.json: openai/gpt-oss-20b's (24 layers alternating sliding/full attention, 32 experts top-4, hidden and
    intermediate 2880, 64 heads / 8 KV heads of 64, vocab 201088, sliding window 128, YaRN rope, swiglu limit 7,
    quantization_config mxfp4 with OpenAI's modules_to_not_convert). Only the special-token ids differ: they are
    the embedded harmony tokenizer's (ids 0..8), because o200k's (199999, 200002, ...) do not exist in it.
  - experts as OpenAI's MXFP4 `*_blocks` (E, out, in/32, 16) / `*_scales` (E, out, in/32), encoded by the same
    function our MXFP4 exporter uses (engine/fp4/export_mxfp4.encode_openai); everything else BF16.
  - sharded safetensors (`model-0000i-of-0000n.safetensors`) with `model.safetensors.index.json`.
  - the embedded harmony tokenizer with its chat template (its 1,467 ids are a subset of the 201,088-row
    vocabulary; the other rows are random like the rest), generation_config.json.
Random weights: what a run on it measures is mechanics, memory, disk and time, never quality.

Memory: the tensor names and shapes come from a model built on the meta device (no storage); each shard's tensors
are generated on --device, moved to CPU and written, so at most one shard (--max-shard-size) is in CPU RAM.
`--layers`, `--experts`, `--hidden-size`, `--vocab-size` give scaled-down shapes for CPU tests.

    python bench/make_gpt_oss_checkpoint.py /data/gpt-oss-20b-random --device cuda

Result: the checkpoint directory given; a one-line JSON summary on stdout (files, bytes, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import embedded_model  # noqa: E402
from engine.data.harmony import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN  # noqa: E402
from engine.fp4.export_mxfp4 import MODULES_TO_NOT_CONVERT, MXFP4_BLOCK, encode_openai  # noqa: E402

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
INIT_STD = 0.02  # gpt-oss's initializer_range


def gpt_oss_20b_config(layers: int = 24, experts: int = 32, hidden: int = 2880, vocab: int = 201_088) -> dict:
    """openai/gpt-oss-20b's config.json (transformers' field names), with optional scaled-down sizes."""
    special = embedded_model.special_id
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": special(BOS_TOKEN),
        "eos_token_id": special(EOS_TOKEN),
        "pad_token_id": special(PAD_TOKEN),
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initial_context_length": 4096,
        "initializer_range": INIT_STD,
        "intermediate_size": hidden,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131_072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "output_router_logits": False,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT)},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150_000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


def tensor_plan(config: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor in the checkpoint, in transformers' names; experts as blocks/scales."""
    from transformers import GptOssConfig, GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(GptOssConfig(**{k: v for k, v in config.items() if k != "quantization_config"}))
    plan = []
    for name, param in model.state_dict().items():
        if name.endswith(EXPERT_WEIGHTS):
            experts, inp, out = param.shape  # transformers keeps (E, in, out); OpenAI stores (E, out, in/32, 16)
            plan.append((f"{name}_blocks", (experts, out, inp // MXFP4_BLOCK, MXFP4_BLOCK // 2), torch.uint8))
            plan.append((f"{name}_scales", (experts, out, inp // MXFP4_BLOCK), torch.uint8))
        else:
            plan.append((name, tuple(param.shape), torch.bfloat16))
    return plan


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def shard_plan(plan: list, max_shard_bytes: int) -> list[list]:
    """The plan split into shards in order (engine/fp4/dequantize_nvfp4.shard_groups, the splitter the NVFP4
    dequantizer writes with); a tensor larger than the limit gets its own shard."""
    from engine.fp4.dequantize_nvfp4 import shard_groups

    by_name = {item[0]: item for item in plan}
    groups = shard_groups({name: nbytes(item[1], item[2]) for name, item in by_name.items()}, max_shard_bytes)
    return [[by_name[name] for name in group] for group in groups]


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """BF16 values as a trained gpt-oss roughly has them: norms at 1, biases small, matrices N(0, 0.02)."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    std = INIT_STD * (0.1 if name.endswith((".bias", "sinks")) else 1.0)
    return (torch.randn(shape, generator=generator, device=device) * std).to(torch.bfloat16)


def expert_tensors(base: str, config: dict, generator: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    """One expert weight, random in (E, in, out) as transformers holds it, MXFP4-encoded with our exporter's
    encoding (blocks along the input dim): the upcast model's weights are then exactly representable in MXFP4."""
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    inp, out = (hidden, 2 * inter) if base.endswith("gate_up_proj") else (inter, hidden)
    weight = torch.randn((experts, inp, out), generator=generator, device=device) * INIT_STD
    blocks, scales = encode_openai(weight)
    return {f"{base}_blocks": blocks, f"{base}_scales": scales}


def write_checkpoint(out: Path, config: dict, device: str = "cpu", seed: int = 0,
                     max_shard_bytes: int = 5 * 1024**3, log=print) -> dict:
    """Write the checkpoint into `out` (through `out.tmp`, renamed at the end). Returns a summary."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards = shard_plan(tensor_plan(config), max_shard_bytes)
    weight_map, total, started = {}, 0, time.time()
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, _ in shard:
            if name.endswith(tuple(f"{w}_scales" for w in EXPERT_WEIGHTS)):
                continue  # written with its blocks
            if name.endswith(tuple(f"{w}_blocks" for w in EXPERT_WEIGHTS)):
                produced = expert_tensors(name.removesuffix("_blocks"), config, generator, device)
            else:
                produced = {name: random_tensor(name, shape, generator, device)}
            tensors.update({k: v.to("cpu").contiguous() for k, v in produced.items()})
        # A _scales planned into the next shard is written beside its _blocks: the index says where each one is.
        save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
        log(f"[{time.time() - started:6.1f} s] {filename}: {len(tensors)} tensors")
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    embedded_model.generation_config().save_pretrained(str(tmp))
    embedded_model.save_tokenizer(embedded_model.load_tokenizer(), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"path": str(out), "bytes": total, "shards": len(shards), "tensors": len(weight_map),
            "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn and MXFP4-encoded "
                        "(cuda for the 20b shape; on cpu the MXFP4 encoding of 20b takes long)")
    parser.add_argument("--layers", type=int, default=24, help="num_hidden_layers (20b: 24)")
    parser.add_argument("--experts", type=int, default=32, help="num_local_experts (20b: 32; top-4 stays)")
    parser.add_argument("--hidden-size", type=int, default=2880,
                        help="hidden_size = intermediate_size (20b: 2880; a multiple of 32)")
    parser.add_argument("--vocab-size", type=int, default=201_088,
                        help="vocabulary rows (20b: 201088; at least the tokenizer's 1,467 ids)")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hidden_size % MXFP4_BLOCK:
        parser.error(f"--hidden-size must be a multiple of {MXFP4_BLOCK} (MXFP4 blocks)")
    vocab_needed = len(embedded_model.load_tokenizer())
    if args.vocab_size < vocab_needed:
        parser.error(f"--vocab-size must be at least the tokenizer's {vocab_needed} ids")
    config = gpt_oss_20b_config(args.layers, args.experts, args.hidden_size, args.vocab_size)
    summary = write_checkpoint(args.out, config, args.device, args.seed, int(args.max_shard_size_gb * 1024**3))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
