"""Export an NVFP4-quantized gpt-oss as a real NVFP4 checkpoint in modelopt's unified HF format, and verify it.

What modelopt 0.47's `export_hf_checkpoint` does with our gpt-oss (measured on the tiny model, CPU, with our
FP4 backend; it runs on CPU):
- Expert weights stay fused 3-D per layer, in transformers' (E, in, out) orientation:
  `...experts.gate_up_proj` uint8 (E, in/2, out), `..._weight_scale` float8_e4m3fn (E, in/block, out),
  `..._weight_scale_2` float32 scalar (global amax / (6 * 448)), plus `..._input_scale` float32 scalar for W4A4.
  The blocks run along the *input* dim, like the training (it quantizes the (E, out, in) transpose and transposes
  the packed bytes and scales back). config.json gets `quantization_config` {"quant_method": "modelopt",
  "quant_algo": "W4A16_NVFP4" | "NVFP4", "config_groups": ..., "ignore": [...]} and hf_quant_config.json is written.
- But it packs `weight.to(dtype)` with per-block scales computed from the uncast weight. For a float32 model
  (our CPU default) exported as bf16, the bf16 rounding moves some weights across FP4 rounding bounds: ~0.3% of
  the expert elements differ from the trained fake-quant weights by a full FP4 step. (A bf16 model exports exactly.)
- It converts the model in place (expert weights become packed uint8 parameters), so the model cannot be used
  (or verified against) afterwards, and it leaves unquantized tensors in the model dtype whatever `dtype` says.
So we write the same format ourselves: the same tensor names, layouts and dtypes, the config from modelopt's own
`get_quant_config` / `convert_hf_quant_config_format`, the codes and scales from modelopt's `NVFP4QTensor` applied
to the master weights in their own dtype with the quantizer's global scale (what the fake quant computes), and the
other tensors cast to `dtype`. tests/test_export.py checks that, for a bf16 model, our files equal modelopt's byte
for byte, and that the dequantized export equals the fake-quant weights exactly.

transformers cannot load pre-quantized NVFP4 ("not supported yet" in 5.x), so verification dequantizes the
safetensors with `NVFP4QTensor.dequantize` (one tensor at a time) and checks names and shapes against a GptOss
model; `load_dequantized` builds a plain GptOss from the export (e.g. to compare logits).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor

from engine.fp4 import torch_backend, modelopt_glue
from engine.fp4.export_mxfp4 import (
    MAX_SHARD_SIZE,
    compare_exact,
    export_dtype,
    manifest,
    non_expert_state,
    save_config,
    save_tensors,
    save_tokenizer,
    write_atomic,
)


def _check_nv_quantizer(name: str, quantizer) -> int:
    """The quantizer's block size; raise unless it is an enabled NVFP4 weight quantizer."""
    if quantizer is None or not quantizer.is_enabled:
        raise ValueError(f"{name} has no enabled weight quantizer: NVFP4 export needs a model quantized to nvfp4 "
                         "(the PTQ or QAT output), since the global scale comes from its calibrated amax")
    block_sizes = quantizer.block_sizes or {}
    if tuple(quantizer.num_bits) != torch_backend.E2M1_BITS or tuple(block_sizes.get("scale_bits") or ()) != torch_backend.NV_SCALE_BITS:
        raise ValueError(f"{name} is not quantized to NVFP4 (num_bits={quantizer.num_bits}, block_sizes={block_sizes})")
    return int(block_sizes[-1])


def encode_expert(module: torch.nn.Module, attr: str, item: modelopt_glue.ExpertWeight) -> dict[str, Tensor]:
    """One fused expert weight in modelopt's layout: packed (E, in/2, out), fp8 scales (E, in/B, out), scale_2."""
    from modelopt.torch.export.quant_utils import get_activation_scaling_factor, get_weight_scaling_factor_2
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    block = _check_nv_quantizer(item.name, item.quantizer)
    weight = item.weight
    scale_2 = get_weight_scaling_factor_2(module, attr).float().reshape(())
    # Blocks along the input dim: quantize the (E, out, in) view in the weight's own dtype, as the fake quant does.
    qtensor, scales, _ = NVFP4QTensor.quantize(weight.detach().transpose(-1, -2).contiguous(), block,
                                               weights_scaling_factor_2=scale_2.to(weight.device))
    out = {
        attr: qtensor._quantized_data.transpose(-1, -2).contiguous().cpu(),
        f"{attr}_weight_scale": scales.transpose(-1, -2).contiguous().cpu(),
        f"{attr}_weight_scale_2": scale_2.cpu(),
    }
    input_quantizer = getattr(module, f"{attr}_input_quantizer", None)
    if input_quantizer is not None and input_quantizer.is_enabled:  # W4A4: the activations' global scale
        input_scale = get_activation_scaling_factor(module, f"{attr}_input_quantizer")
        out[f"{attr}_input_scale"] = input_scale.float().reshape(()).cpu()
    return out


def nvfp4_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    experts = list(modelopt_glue.expert_weights(model))
    if not experts:
        raise ValueError("no gpt-oss expert weights (gate_up_proj / down_proj) found in the model")
    tensors = {n: t.detach().to(dtype) for n, t in non_expert_state(model, skip=[e.name for e in experts]).items()}
    for item in experts:
        module_name, _, attr = item.name.rpartition(".")
        encoded = encode_expert(model.get_submodule(module_name), attr, item)
        tensors.update({f"{module_name}.{key}": value for key, value in encoded.items()})
    return tensors


def quant_configs(model: torch.nn.Module) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config), from modelopt's own functions."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import get_quant_config

    hf_quant_config = get_quant_config(model)
    return hf_quant_config, convert_hf_quant_config_format(copy.deepcopy(hf_quant_config))


def export_nvfp4(model: torch.nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> dict:
    """Write `model` (quantized to nvfp4 / nvfp4_w4a4) as a modelopt unified NVFP4 checkpoint; return a manifest.

    Unlike modelopt's exporter this leaves `model` unchanged.
    """
    tensors = nvfp4_tensors(model, dtype)
    hf_quant_config, quantization_config = quant_configs(model)

    def write(tmp: Path) -> list[str]:
        files = save_tensors(tensors, tmp, max_shard_size)
        _save_config(model, tmp, dtype, quantization_config)
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=4))
        save_tokenizer(tokenizer, tmp)
        return files

    out_dir, _ = write_atomic(Path(out_dir), write)
    algo = hf_quant_config["quantization"]["quant_algo"]
    fmt = "nvfp4" if algo == "W4A16_NVFP4" else "nvfp4_w4a4"
    return {**manifest(out_dir, fmt, dtype), "quant_algo": algo}


def _save_config(model: torch.nn.Module, directory: Path, dtype: torch.dtype, quantization_config: dict) -> None:
    save_config(model, directory, dtype, quantization_config)
    try:  # modelopt's deployment fix-ups of config.json (no-ops for gpt-oss today), as its exporter applies them
        from modelopt.torch.export.plugins.hf_checkpoint_utils import sanitize_hf_config_for_deployment
    except ImportError:
        return
    path = directory / "config.json"
    data = json.loads(path.read_text())
    sanitize_hf_config_for_deployment(data, model)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------------ reading


def read_tensors(out_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def dequantize_expert(tensors: dict[str, Tensor], name: str) -> Tensor:
    """float32 (E, in, out) weight from `name` (packed), `name_weight_scale`, `name_weight_scale_2`."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    packed = tensors[name].transpose(-1, -2).contiguous()  # (E, out, in/2)
    scales = tensors[f"{name}_weight_scale"].transpose(-1, -2).contiguous()  # (E, out, in/B)
    in_dim = packed.shape[-1] * 2
    if in_dim % scales.shape[-1]:
        raise ValueError(f"{name}: scales {tuple(scales.shape)} do not tile the input dim {in_dim}")
    block = in_dim // scales.shape[-1]
    qtensor = NVFP4QTensor(torch.Size((*packed.shape[:-1], in_dim)), torch.float32, packed)
    weight = qtensor.dequantize(dtype=torch.float32, scale=scales, double_scale=tensors[f"{name}_weight_scale_2"],
                                block_sizes={-1: block})
    return weight.transpose(-1, -2).contiguous()


SCALE_SUFFIXES = ("_weight_scale", "_weight_scale_2", "_input_scale")


def _packed_experts(tensors: dict[str, Tensor]) -> list[str]:
    return [n for n in tensors if n.endswith(modelopt_glue.EXPERT_WEIGHTS) and tensors[n].dtype == torch.uint8]


def dequantized_state(out_dir: Path, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The export as a plain GptOss state dict: experts dequantized (float32, or `dtype`), the rest as stored."""
    tensors = read_tensors(out_dir)
    state = {n: t for n, t in tensors.items() if not n.endswith(SCALE_SUFFIXES)}
    for name in _packed_experts(tensors):
        weight = dequantize_expert(tensors, name)
        state[name] = weight if dtype is None else weight.to(dtype)
    return state


def _plain_config(out_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(out_dir))
    if hasattr(config, "quantization_config"):  # a plain model now: nothing left for a quantizer to do
        delattr(config, "quantization_config")
    config._attn_implementation = "eager"
    return config


def load_dequantized(out_dir: Path, dtype: torch.dtype | None = None):
    """A plain GptOssForCausalLM (CPU) holding the export's weights, experts dequantized; strict key match."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or export_dtype(out_dir)
    model = AutoModelForCausalLM.from_config(_plain_config(out_dir), dtype=dtype)
    model.load_state_dict(dequantized_state(out_dir, dtype), strict=True)
    return model.eval()


def _check_layout(out_dir: Path, tensors: dict[str, Tensor]) -> None:
    """Names and (dequantized) shapes must be exactly a GptOss state dict's; checked on a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_plain_config(out_dir))
    wanted = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    have = {n: tuple(t.shape) for n, t in tensors.items() if not n.endswith(SCALE_SUFFIXES)}
    for name in _packed_experts(tensors):
        have[name] = (have[name][0], have[name][1] * 2, have[name][2])  # two FP4 values a byte along in
    if have != wanted:
        wrong = sorted(n for n in set(have) | set(wanted) if have.get(n) != wanted.get(n))
        raise ValueError(f"export {out_dir} does not match the GptOss layout: {wrong[:8]}")


def verify_nvfp4_export(
    out_dir: Path, expected: dict[str, Tensor], others: dict[str, Tensor] | None = None
) -> dict:
    """Dequantize the export with modelopt's NVFP4QTensor and check it against the trained model.

    `expected`: the (E, in, out) fake-quant expert weights; each dequantized expert weight (float32) must equal
    it exactly in `expected`'s own dtype (NVFP4 values need float32: scale_2 is arbitrary, so no bf16 cast here).
    `others`: the model's other tensors, which must equal their cast to the export dtype. Names and shapes must be
    exactly a GptOss model's. One expert tensor is dequantized at a time (memory). Raises ValueError.
    """
    dtype = export_dtype(out_dir)
    tensors = read_tensors(out_dir)
    _check_layout(out_dir, tensors)
    unexpected = [n for n in _packed_experts(tensors) if n not in expected]
    if unexpected:
        raise ValueError(f"export holds expert weights nobody expected: {unexpected}")
    max_diff = 0.0
    for name, weight in expected.items():
        if name not in tensors or tensors[name].dtype != torch.uint8:
            raise ValueError(f"{name} missing from the export (or not NVFP4-packed)")
        dequantized = dequantize_expert(tensors, name).to(weight.dtype)
        max_diff = max(max_diff, compare_exact(name, dequantized, weight, weight.dtype))
    others_diff = 0.0
    for name, tensor in (others or {}).items():
        if name not in tensors:
            raise ValueError(f"{name} missing from the export")
        others_diff = max(others_diff, compare_exact(name, tensors[name], tensor, dtype))
    return {"max_abs_diff": max_diff, "others_max_abs_diff": others_diff,
            "tensors_checked": len(expected) + len(others or {}), "dtype": str(dtype).removeprefix("torch.")}
