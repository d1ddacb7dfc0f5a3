"""Export a (QAT / PTQ / plain) gpt-oss as a real MXFP4 checkpoint in OpenAI's layout, and verify it.

Why we write it ourselves: modelopt 0.47's `export_hf_checkpoint` stores gpt-oss MXFP4 experts with their blocks
along the *output* dim (measured: `gate_up_proj` uint8 (E, in, out/2) with `gate_up_proj_weight_scale` uint8
(E, in, out/32), quant_method "modelopt"), while QAT quantized them along the *input* dim (modelopt's gpt-oss
wrapper quantizes the (E, out, in) transpose of transformers' (E, in, out) expert weights). The served weights
would not be the trained ones, and the names are not the `_blocks` / `_scales` that gpt-oss servers load.
NVIDIA's own examples/gpt-oss/convert_oai_mxfp4_weight_only.py writes OpenAI's layout instead; so do we, but
from the *fake-quantized* weights the model computes with (`modelopt_glue.effective_expert_weights`), so the file holds
exactly the trained numbers whatever kernel produced them (re-encoding MXFP4 values is lossless).

OpenAI's layout, as transformers' Mxfp4 loader reads it (integrations/mxfp4.py, `_convert_moe_packed_tensors`):
  model.layers.{i}.mlp.experts.{gate_up,down}_proj_blocks  uint8 (E, out, in/32, 16): two E2M1 codes a byte,
      low nibble = even element, code = sign<<3 | magnitude index into [0, .5, 1, 1.5, 2, 3, 4, 6]
  model.layers.{i}.mlp.experts.{gate_up,down}_proj_scales  uint8 (E, out, in/32): E8M0, value 2**(s - 127)
The loader decodes with a lookup table, `ldexp(value, s - 127)`, reshapes to (E, out, in) and transposes to
transformers' (E, in, out); gate/up stay interleaved on the out dim exactly as in the in-memory parameter.
Everything else (attention, router, embeddings, norms, lm_head, sinks, expert biases) is stored in `dtype`.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from engine.fp4 import torch_backend, modelopt_glue
from engine.fp4.model_io import replace_dir

MXFP4_BLOCK = 32  # the MX spec's block; OpenAI's checkpoints and the Triton MoE kernels assume it
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
MAX_SHARD_SIZE = "5GB"


# ------------------------------------------------------------------------------------- shared helpers


def non_expert_state(model: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, Tensor]:
    """The model's state dict minus modelopt quantizer entries, minus `skip` and minus tied duplicates."""
    skip = set(skip)
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        if name in skip or "_quantizer." in name or name.endswith("_quantizer"):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:  # tied weight (e.g. lm_head = embed_tokens): transformers re-ties it on load
            continue
        seen.add(key)
        out[name] = tensor
    return out


def save_tensors(tensors: dict[str, Tensor], directory: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> list[str]:
    """Write safetensors shards (+ index when more than one), as save_pretrained would; returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    files = []
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors[name].detach().to("cpu").contiguous() for name in names}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        files.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append("model.safetensors.index.json")
    return files


def save_config(model: torch.nn.Module, directory: Path, dtype: torch.dtype, quantization_config: dict) -> None:
    """config.json without modelopt state, with the export dtype and `quantization_config`; plus generation config."""
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.quantization_config = quantization_config
    config.save_pretrained(str(directory))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(directory))


def save_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is not None:
        # The chat template inside tokenizer_config.json, as gpt-oss ships it (and every loader reads it).
        tokenizer.save_pretrained(str(directory), save_jinja_files=False)


def write_atomic(out_dir: Path, write) -> tuple[Path, list[str]]:
    """Run `write(tmp_dir) -> files` in `<out_dir>.tmp`, then rename it over `out_dir`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir, files


def manifest(out_dir: Path, fmt: str, dtype: torch.dtype) -> dict:
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    size = sum((out_dir / f).stat().st_size for f in files)
    return {"format": fmt, "path": str(out_dir), "files": files, "bytes": size,
            "dtype": str(dtype).removeprefix("torch.")}


def load_export(out_dir: Path, dtype: torch.dtype, **kwargs):
    """from_pretrained on CPU, failing on any missing / unexpected / mismatched key (a silent re-init would pass)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=dtype, attn_implementation="eager", output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"export {out_dir} does not load cleanly: {problems}")
    return model


def compare_exact(name: str, loaded: Tensor, expected: Tensor, dtype: torch.dtype) -> float:
    """Raise unless `loaded` equals `expected` cast to the export dtype; return max |loaded - expected| (float64)."""
    expected = expected.detach().to("cpu")
    loaded = loaded.detach().to("cpu")
    if loaded.shape != expected.shape:
        raise ValueError(f"{name}: exported shape {tuple(loaded.shape)} != expected {tuple(expected.shape)}")
    if not torch.equal(loaded.to(dtype), expected.to(dtype)):
        diff = (loaded.double() - expected.double()).abs()
        raise ValueError(f"{name}: exported weights differ from the trained ones "
                         f"(max |diff| {diff.max().item():.3g}, {int((diff > 0).sum())} of {diff.numel()} elements)")
    return (loaded.double() - expected.double()).abs().max().item() if loaded.numel() else 0.0


def export_dtype(out_dir: Path) -> torch.dtype:
    config = json.loads((Path(out_dir) / "config.json").read_text())
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")


# ------------------------------------------------------------------------------------------------ MXFP4


def _check_mx_quantizer(name: str, quantizer) -> None:
    """Only an enabled MX quantizer with block 32 along the input dim produces weights OpenAI's layout can hold."""
    if quantizer is None or not quantizer.is_enabled:
        return
    block_sizes = quantizer.block_sizes or {}
    scale_bits = tuple(block_sizes.get("scale_bits") or ())
    if tuple(quantizer.num_bits) != torch_backend.E2M1_BITS or scale_bits != torch_backend.MX_SCALE_BITS:
        raise ValueError(f"{name} is not quantized to MXFP4 (num_bits={quantizer.num_bits}, "
                         f"block_sizes={block_sizes}); export it with the format it was trained for")
    block = block_sizes.get(-1)
    if block != MXFP4_BLOCK:
        raise ValueError(f"{name} uses MXFP4 block size {block}; OpenAI's MXFP4 layout (and its kernels) need 32")


def mxfp4_expert_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The (E, in, out) expert weights to export: the model's fake-quant weights, or MXFP4 of a plain model's."""
    quantizers = {item.name: item.quantizer for item in modelopt_glue.expert_weights(model)}
    for name, quantizer in quantizers.items():
        _check_mx_quantizer(name, quantizer)
    weights = modelopt_glue.effective_expert_weights(model)
    for name, weight in weights.items():
        quantizer = quantizers[name]
        if quantizer is None or not quantizer.is_enabled:
            # Same as the quantized model computes: blocks along the input dim of the (E, out, in) view.
            weights[name] = torch_backend.mxfp4_fake_quant(weight.transpose(-1, -2), MXFP4_BLOCK).transpose(-1, -2)
    return weights


def encode_openai(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(E, in, out) MXFP4-valued weight -> OpenAI's (E, out, in/32, 16) blocks and (E, out, in/32) scales."""
    blocks, scales = torch_backend.mxfp4_encode(weight.transpose(-1, -2).contiguous(), MXFP4_BLOCK)
    return blocks, scales


def mxfp4_tensors(model: torch.nn.Module, dtype: torch.dtype, expert_weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's tensors: `_blocks`/`_scales` for the experts, everything else cast to `dtype`."""
    tensors = {name: t.detach().to(dtype) for name, t in non_expert_state(model, skip=expert_weights).items()}
    for name, weight in expert_weights.items():
        blocks, scales = encode_openai(weight)
        tensors[f"{name}_blocks"] = blocks.cpu()
        tensors[f"{name}_scales"] = scales.cpu()
    return tensors


def export_mxfp4(model: torch.nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> dict:
    """Write `model` as an OpenAI-layout MXFP4 checkpoint to `out_dir` (atomically); return a manifest."""
    expert_weights = mxfp4_expert_weights(model)
    if not expert_weights:
        raise ValueError("no gpt-oss expert weights (gate_up_proj / down_proj) found in the model")
    tensors = mxfp4_tensors(model, dtype, expert_weights)
    qcfg = {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT)}

    def write(tmp: Path) -> list[str]:
        files = save_tensors(tensors, tmp, max_shard_size)
        save_config(model, tmp, dtype, qcfg)
        save_tokenizer(tokenizer, tmp)
        return files

    out_dir, _ = write_atomic(Path(out_dir), write)
    return {**manifest(out_dir, "mxfp4", dtype), "expert_tensors": len(expert_weights)}


def verify_mxfp4_export(
    out_dir: Path, expected: dict[str, Tensor], others: dict[str, Tensor] | None = None
) -> dict:
    """Load the export the way users' servers do on CPU (transformers, `Mxfp4Config(dequantize=True)`) and check it.

    `expected`: the (E, in, out) expert weights the model computes with; each must come back exactly (after
    casting to the export dtype: MXFP4 values times a power-of-two scale are exact in bf16, whose exponent range
    is float32's). `others`: optionally the model's remaining tensors, which must equal their cast to the export
    dtype. Every expert weight of the loaded model must be in `expected`. Raises ValueError naming the tensor.
    """
    from transformers import Mxfp4Config

    dtype = export_dtype(out_dir)
    loaded = load_export(Path(out_dir), dtype, quantization_config=Mxfp4Config(dequantize=True)).state_dict()
    return _compare_all(loaded, expected, others, dtype)


def _compare_all(loaded: dict[str, Tensor], expected: dict[str, Tensor], others: dict[str, Tensor] | None,
                 dtype: torch.dtype) -> dict:
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise ValueError(f"expert weights missing from the export: {missing}")
    unchecked = [n for n in loaded if n.endswith(modelopt_glue.EXPERT_WEIGHTS) and n not in expected]
    if unchecked:
        raise ValueError(f"export holds expert weights nobody expected: {unchecked}")
    max_diff = max((compare_exact(n, loaded[n], w, dtype) for n, w in expected.items()), default=0.0)
    others_diff = 0.0
    for name, tensor in (others or {}).items():
        if name not in loaded:
            raise ValueError(f"{name} missing from the export")
        others_diff = max(others_diff, compare_exact(name, loaded[name], tensor, dtype))
    return {"max_abs_diff": max_diff, "others_max_abs_diff": others_diff,
            "tensors_checked": len(expected) + len(others or {}), "dtype": str(dtype).removeprefix("torch.")}
