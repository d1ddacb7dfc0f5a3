"""The fast QAT path for gpt-oss experts: fake-quantize each 3-D expert weight once per forward, then run
transformers' own grouped_mm experts path on it.

Why: modelopt 0.47's `_QuantGptOssExperts` wrapper computes the quantized experts one at a time. Profiled on an H100
(docs/benchmarks.md) its backward has 256 `SelectBackward0` nodes that each build a dense zero gradient of a whole
(32, 2880, 5760) expert tensor, and the step takes 3.5x a BF16 step; the fake-quant kernels themselves are a few ms.
Here the model stays modelopt's (same quantizers, same saved state, same export), only the experts' forward changes:
  W_q = fake_quant(W) along the input dim (engine/fp4/triton_kernel.py on CUDA, engine/fp4/torch_backend.py elsewhere; the numbers of
        modelopt's reference QTensors, bit for bit),
  backward: straight-through (dL/dW = dL/dW_q), nothing saved but what grouped_mm saves anyway.
Weight-only formats only: W4A4 also quantizes the down_proj input inside the experts, which modelopt's wrapper does
by intercepting matmuls; that stays on modelopt's path.
"""

from __future__ import annotations

import types

import torch

from engine.fp4 import torch_backend, modelopt_glue


class _ExpertsView:
    """The experts module as transformers' experts functions see it, with other weight tensors in place."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self._module = module
        self.__dict__.update(weights)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class _StraightThroughFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, kind: str, block: int, global_amax: torch.Tensor | None):
        return fake_quant_input_dim(weight.detach(), kind, block, global_amax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


def fake_quant_input_dim(weight: torch.Tensor, kind: str, block: int, global_amax: torch.Tensor | None) -> torch.Tensor:
    """Fake-quantize an (E, in, out) expert weight with blocks along `in` (what modelopt's wrapper computes)."""
    if weight.is_cuda and torch_backend._triton_ready(weight.transpose(1, 2), block):
        from engine.fp4.triton_kernel import fake_quant_3d

        scale = torch_backend.nvfp4_global_scale(weight, global_amax) if kind == "nv" else None
        return fake_quant_3d(weight, kind, block, scale)
    t = weight.transpose(1, 2)
    out = torch_backend.mxfp4_fake_quant(t, block) if kind == "mx" else torch_backend.nvfp4_fake_quant(t, block, global_amax)
    return out.transpose(1, 2).contiguous()


def _quantizer_spec(quantizer, weight: torch.Tensor) -> tuple[str, int, torch.Tensor | None]:
    kind = torch_backend._check_supported(quantizer)
    block = torch_backend._block_size_of(quantizer, weight)
    amax = quantizer._get_amax(weight.transpose(1, 2)) if kind == "nv" else None
    return kind, block, amax


def _fast_forward(self, hidden_states, router_indices=None, routing_weights=None):
    from transformers.integrations.moe import grouped_mm_experts_forward

    hidden_states = self.gate_up_proj_input_quantizer(hidden_states)  # disabled for weight-only formats
    weights, recipes = {}, {}
    for name in modelopt_glue.EXPERT_WEIGHTS:
        weight = self._parameters[name] if name in self._parameters else self.get_parameter(name)
        spec = _quantizer_spec(getattr(self, f"{name}_weight_quantizer"), weight)
        weights[name] = _StraightThroughFakeQuant.apply(weight, *spec)
        recipes[weights[name].untyped_storage().data_ptr()] = (weight, spec)
    view = _ExpertsView(self, weights)
    if not torch.is_grad_enabled():
        return grouped_mm_experts_forward(view, hidden_states, router_indices, routing_weights)
    with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(recipes)):
        return grouped_mm_experts_forward(view, hidden_states, router_indices, routing_weights)


def _recompute_hooks(recipes: dict):
    """Autograd keeps what a matmul needs for backward; for the fake-quantized weights, keep only how to remake them.

    Without this every layer's fake-quantized copy (1.6 GB per gpt-oss-20b layer) stays alive from forward to
    backward, on top of the weights themselves; remaking one costs a ~1 ms kernel.
    Every other saved tensor goes to the hooks that were active around this forward: autograd applies only the
    innermost pair, so under gradient checkpointing (torch.utils.checkpoint installs its own pair around each
    decoder layer) returning the tensor here would keep it alive until backward, defeating the checkpoint. Measured
    on CPU before this fix (bf16 gpt-oss, hidden = intermediate = 128, 32 experts, top-4, checkpointing): 12.9 kB
    per token per layer stayed alive after forward, 3.5 kB with it (as without the fast path); the experts keep about
    2 hidden + 7 intermediate values per token and chosen expert, ~4-5 MiB per token over the 20b's 24 layers. The
    H200 max-context run grew 4 GiB per 1k tokens (docs/benchmarks.md) where the estimator expected 0.4.
    """
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # (pack, unpack) or None
    outer_pack, outer_unpack = outer if outer else (None, None)

    def pack(tensor: torch.Tensor):
        recipe = recipes.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if recipe is not None:
            return ("fake_quant", recipe, tensor.size(), tensor.stride(), tensor.storage_offset())
        return ("outer", outer_pack(tensor)) if outer_pack is not None else tensor

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        if packed[0] == "outer":
            return outer_unpack(packed[1])
        _, (weight, spec), size, stride, offset = packed
        with torch.no_grad():
            remade = fake_quant_input_dim(weight.detach(), *spec)
        return remade.as_strided(size, stride, offset)

    return pack, unpack


def supported(module: torch.nn.Module) -> bool:
    """A modelopt-quantized gpt-oss experts module with weight-only FP4 quantizers our kernels implement."""
    needed = [f"{w}_weight_quantizer" for w in modelopt_glue.EXPERT_WEIGHTS] + ["gate_up_proj_input_quantizer",
                                                                         "down_proj_input_quantizer"]
    if not all(hasattr(module, n) for n in needed):
        return False
    if module.gate_up_proj_input_quantizer.is_enabled or module.down_proj_input_quantizer.is_enabled:
        return False  # W4A4: the down_proj input quantizer lives inside modelopt's matmul interception
    try:
        for w in modelopt_glue.EXPERT_WEIGHTS:
            quantizer = getattr(module, f"{w}_weight_quantizer")
            if not quantizer.is_enabled:
                return False
            torch_backend._check_supported(quantizer)
    except NotImplementedError:
        return False
    return True


def enable(model: torch.nn.Module) -> int:
    """Switch every supported quantized experts module to the fast forward; returns how many were switched."""
    count = 0
    for module in model.modules():
        if supported(module):
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def disable(model: torch.nn.Module) -> None:
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _fast_forward:
            del module.forward
