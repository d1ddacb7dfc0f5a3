"""Everything between our stages and modelopt's quantization API, in one place.

- which modelopt config each FP4 format uses (and the block-size override),
- which fake-quant kernels run (the FP4 backend choice: modelopt's CUDA kernels or our pure-PyTorch backend),
- reading back the exact expert weights the quantized model computes with (for evaluation and export),
- the quantization summary shown before a QAT run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from engine.fp4 import torch_backend

# Our format names -> modelopt 0.47 config constants (NVIDIA's gpt-oss recipe uses these three).
MODELOPT_CONFIGS = {
    "mxfp4": "MXFP4_MLP_WEIGHT_ONLY_CFG",
    "nvfp4": "NVFP4_MLP_WEIGHT_ONLY_CFG",
    "nvfp4_w4a4": "NVFP4_MLP_ONLY_CFG",
}
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def mtq():
    """Import modelopt lazily: it takes seconds and prints warnings, and the web UI must start fast."""
    import modelopt.torch.quantization as mtq_module

    from engine.fp4.import_leaks import drop_pulp_import_tracebacks

    drop_pulp_import_tracebacks()  # else the first caller's frames (and its model) live as long as the process
    return mtq_module


def resolve_backend(fp4_backend: str, device: torch.device | str) -> str | None:
    """The single place that decides which fake-quant kernels run.

    Returns a backend name for modelopt's `"backend"` quantizer key, or None for modelopt's built-in kernels.
    On CPU only our backend can run (modelopt's FP4 fake quant is CUDA-only). On CUDA, 'auto' also picks ours:
    modelopt 0.47 runs NVFP4 through a Triton kernel that ignores the configured block size (16 instead of 32),
    so the trained weights would not match the exported ones; ours follows the config exactly.
    """
    device = torch.device(device)
    if fp4_backend == "modelopt":
        if device.type != "cuda":
            raise ValueError("fp4_backend 'modelopt' needs a CUDA device; use 'torch' or 'auto' on CPU")
        return None
    if fp4_backend not in ("auto", "torch"):
        raise ValueError(f"unknown fp4_backend {fp4_backend!r}; expected auto, modelopt or torch")
    torch_backend.register()
    return torch_backend.BACKEND_NAME


def modelopt_config(fmt: str, backend: str | None = None, block_size: int | None = None) -> dict:
    """A deep copy of modelopt's config for `fmt`, with our backend and block size applied to every enabled quantizer."""
    if fmt not in MODELOPT_CONFIGS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(MODELOPT_CONFIGS)}")
    cfg = copy.deepcopy(getattr(mtq(), MODELOPT_CONFIGS[fmt]))
    for entry in cfg["quant_cfg"]:
        attrs = entry.get("cfg")
        if not isinstance(attrs, dict) or entry.get("enable") is False:
            continue
        if backend is not None:
            attrs["backend"] = backend
        if block_size is not None and isinstance(attrs.get("block_sizes"), dict):
            attrs["block_sizes"][-1] = block_size
    return cfg


def prepare_experts_for(model: nn.Module, fmt: str) -> None:
    """Pick the experts' matmul path that modelopt's gpt-oss wrapper supports for `fmt`.

    Weight-only formats work with transformers' grouped_mm path. W4A4 also quantizes the down_proj *input*, which
    modelopt does by intercepting torch.bmm / Tensor.__matmul__; grouped_mm bypasses both, so that input would
    silently stay unquantized. The eager per-expert loop goes through __matmul__, so W4A4 uses it.
    """
    if fmt == "nvfp4_w4a4" and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")


def quantize(
    model: nn.Module,
    fmt: str,
    forward_loop: Callable[[nn.Module], None] | None,
    backend: str | None,
    block_size: int | None = None,
) -> nn.Module:
    """Insert modelopt fake quantizers for `fmt` and calibrate them with `forward_loop` (PTQ)."""
    prepare_experts_for(model, fmt)
    check_block_size(model, block_size or default_block_size(fmt))
    return mtq().quantize(model, modelopt_config(fmt, backend, block_size), forward_loop)


def default_block_size(fmt: str) -> int:
    cfg = getattr(mtq(), MODELOPT_CONFIGS[fmt])
    for entry in cfg["quant_cfg"]:
        attrs = entry.get("cfg")
        if isinstance(attrs, dict) and "weight_quantizer" in entry.get("quantizer_name", ""):
            return int(attrs["block_sizes"][-1])
    raise ValueError(f"no weight quantizer in modelopt's config for {fmt}")


def check_block_size(model: nn.Module, block_size: int) -> None:
    """Blocks run along each expert weight's input dim; refuse sizes that do not divide it (modelopt would pad)."""
    for name, weight in _expert_params(model):
        in_dim = weight.shape[1]
        if in_dim % block_size:
            raise ValueError(
                f"block size {block_size} does not divide the input dim {in_dim} of {name}; "
                f"choose a block size that divides {in_dim} (e.g. 32 or 16)"
            )


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Point every enabled quantizer at `backend` (e.g. after loading a checkpoint saved on another device)."""
    count = 0
    for quantizer in _quantizers(model):
        if quantizer.is_enabled:
            quantizer.backend = backend
            count += 1
    return count


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in _quantizers(model))


@dataclass
class ExpertWeight:
    name: str  # e.g. "model.layers.0.mlp.experts.gate_up_proj"
    weight: torch.Tensor  # the trainable master weight, (E, in, out)
    quantizer: nn.Module | None  # its weight quantizer, or None when the model is not quantized


def expert_weights(model: nn.Module) -> Iterator[ExpertWeight]:
    for name, module in model.named_modules():
        if not all(hasattr(module, attr) for attr in EXPERT_WEIGHTS) or not hasattr(module, "gate_up_proj_bias"):
            continue
        for attr in EXPERT_WEIGHTS:
            param = module._parameters.get(attr)
            if param is None:  # modelopt turns the attribute into a dynamic one; the Parameter stays registered
                param = dict(module.named_parameters(recurse=False))[attr]
            quantizer = getattr(module, f"{attr}_weight_quantizer", None)
            yield ExpertWeight(f"{name}.{attr}", param, quantizer)


def _expert_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for item in expert_weights(model):
        yield item.name, item.weight


@torch.no_grad()
def effective_expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert weights exactly as the model multiplies with them, (E, in, out).

    For a quantized model this is the fake-quantized weight, computed the way modelopt's gpt-oss wrapper does it:
    blocks along the input dim, i.e. quantize the (E, out, in) transpose and transpose back.
    """
    out = {}
    for item in expert_weights(model):
        q = item.quantizer
        if q is not None and q.is_enabled:
            out[item.name] = apply_weight_quantizer(q, item.weight)
        else:
            out[item.name] = item.weight.detach().clone()
    return out


@contextlib.contextmanager
def weights_quantized_once(model: nn.Module) -> Iterator[int]:
    """For the duration, the expert weights hold their fake-quantized values and their weight quantizers are off.

    modelopt re-quantizes every expert weight at every forward; evaluation's greedy generation makes ~100 forwards per
    batch of the same weights. The model computes with exactly the same numbers (tests/test_fp4.py compares logits
    bit for bit); input quantizers (W4A4) stay on. The masters wait on the CPU (at 20b size the expert weights are
    ~26 GB in bf16) and are put back bit-exact on exit, also on error: QAT may train this model next. Yields the
    number of weights fixed (0 for a model without enabled weight quantizers, and for one with live LoRA adapters:
    an adapter on an expert weight is added before quantization, which fixed weights would not reproduce)."""
    stash = []
    live_adapters = any("lora_" in name for name, _ in model.named_parameters())
    try:
        with torch.no_grad():
            for item in ([] if live_adapters else expert_weights(model)):
                if item.quantizer is None or not item.quantizer.is_enabled:
                    continue
                effective = apply_weight_quantizer(item.quantizer, item.weight)
                stash.append((item, item.weight.detach().to("cpu", copy=True)))
                item.weight.copy_(effective)
                item.quantizer.disable()
        yield len(stash)
    finally:
        with torch.no_grad():
            for item, master in stash:
                item.weight.copy_(master.to(item.weight.device))
                item.quantizer.enable()


@torch.no_grad()
def apply_weight_quantizer(quantizer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An (E, in, out) expert weight through its quantizer, blocks along the input dim (as modelopt's wrapper)."""
    return quantizer(weight.transpose(-1, -2).contiguous()).transpose(-1, -2).contiguous()


@torch.no_grad()
def relative_weight_error(quantized: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """||Wq - W||_F / ||W||_F over all expert weights, plus one value per layer and projection."""
    per_tensor, num, den = {}, 0.0, 0.0
    for name, wq in quantized.items():
        w = reference[name].float()
        diff = (wq.float() - w).pow(2).sum().item()
        norm = w.pow(2).sum().item()
        per_tensor[name] = (diff / norm) ** 0.5 if norm else 0.0
        num, den = num + diff, den + norm
    return {"overall": (num / den) ** 0.5 if den else 0.0, "per_tensor": per_tensor}


def _quantizers(model: nn.Module) -> Iterator[nn.Module]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            yield module


def quant_summary(model: nn.Module) -> list[dict]:
    """One row per quantizer (the table shown before QAT): module, quantizer, enabled, description."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            parent, _, leaf = name.rpartition(".")
            rows.append({"module": parent, "quantizer": leaf, "enabled": bool(module.is_enabled), "detail": str(module)})
    return rows
