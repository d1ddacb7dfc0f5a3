"""Pure-PyTorch FP4 (MXFP4 / NVFP4) fake quantization, plugged into modelopt as a quant backend.

Why this exists: NVIDIA Model Optimizer 0.47 has no CPU path for FP4 fake quant. Its dynamic block
quantizer calls a CUDA extension (MXFP4; skipped on CPU installs) or asserts "amax must be a CUDA
tensor" (NVFP4), so QAT cannot run on a machine without a GPU. modelopt offers a public hook,
`register_quant_backend(name, fn)`: a quantizer whose config has `"backend": name` hands its
input to `fn(inputs, quantizer)` instead of its kernels. This module is such a backend, written
in plain torch ops so the very same code runs on CPU and CUDA tensors.

What it matches, bit for bit (exact zeros' sign included), on finite inputs:
- MXFP4: `MXFP4QTensor.quantize(x, B)` then `.dequantize(...)` - E8M0 scale
  2**ceil(log2(amax/6)) (log2 in float32, clamped at -127), E2M1 ties to the *smaller*
  magnitude (its strict `>` against the bounds), exact zeros come back as -0.0.
- NVFP4: `NVFP4QTensor.quantize(x, B, weights_scaling_factor_2=global_amax/(6*448))` then
  `.dequantize(...)` - per-block scale block_amax/(6*scale_2) clamped to [2**-9, 448] and cast
  to float8_e4m3fn (zero scales -> 1.0), E2M1 ties to even.
These reference classes are what modelopt's exporter uses to write real FP4 checkpoints, so QAT
with this backend trains against exactly the numbers that get exported.

Findings about modelopt's own CUDA kernels (measured by tests/test_fp4_gpu.py):
- MX CUDA extension (`tensor_quant_mx.cu`, what mtq runs for MXFP4 on a GPU): rounds E2M1 ties
  to *even* (0.75 -> 1, 1.75 -> 2, 3.5 -> 4) where MXFP4QTensor rounds them down - about 0.5% of
  the elements of bf16 weights differ. It also takes the E8M0 exponent from the float bits (an
  exact ceil) where MXFP4QTensor uses float32 `torch.log2`, which rounds to an integer when amax/6
  is a few ulp above a power of two (float32 inputs only; bf16 has too few bits to get there).
  Its zero outputs have an undefined sign.
- NVFP4 Triton kernel (`fp4_kernel_hopper.fp4_fake_quant_block`, used on sm >= 8.9) is called
  by `_dynamic_block_quantize_impl` WITHOUT a block size, so it always uses its default block 16,
  even when the config says 32 (modelopt's NVFP4_MLP_WEIGHT_ONLY_CFG does). It also has no
  2**-9 lower clamp on the FP8 block scale, replaces dequantized block scales below 1e-5 by 1.0
  (zeroing such blocks), and returns -0.0 for negatives that round to zero. Its fp32 division is
  not correctly rounded: quotients exactly on an E2M1 midpoint can come out one ulp low and round
  down instead of to even (0.04% of elements of N(0, 0.02) bf16 weights on an H100). Our backend
  follows the config's block size, as the reference QTensor does.

The reference itself is not device-independent for float32 inputs: its NVFP4 output differed
between CPU and an H100 by an ulp or two on a few crafted float32 elements (likely PyTorch's CUDA
`tensor / python_scalar`, a multiply by the reciprocal, in amax / 2688); none for bf16. We use the
reference's own ops, so we match it on each device.

Deliberate deviations from the reference: a last dim that is not a multiple of the block size is
zero-padded and sliced back (what modelopt's CUDA kernels do; the reference QTensors cannot do
it), and an NVFP4 global amax of 0 uses scale_2 = 1 instead of dividing by zero (the reference
returns NaN there; Triton returns zeros, as we do for an all-zero tensor). NaN/Inf inputs are
not bit-matched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

BACKEND_NAME = "qat_studio_fp4"

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
MX_SCALE_BITS = (8, 0)
NV_SCALE_BITS = (4, 3)
E2M1_BITS = (2, 1)

_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Temporaries are float32/int32 per element; working in chunks of this many elements caps the
# extra memory at a few hundred MiB even for a (32, 5760, 2880) gpt-oss-20b expert tensor.
_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=None)
def _table(name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Small constant tables, built once per device/dtype."""
    if name == "mx_bounds":
        # MXFP4QTensor counts bounds strictly below |x|: ties go to the smaller magnitude.
        return torch.tensor(_E2M1_BOUNDS, dtype=dtype, device=device)
    if name == "nv_bounds":
        # NVFP4QTensor adds 1 at the odd midpoints 0.75/1.75/3.5 (ties to even). Counting bounds
        # strictly below |x| with those three moved down one ulp of |x|'s dtype is the same rule
        # in a single bucketize, instead of the reference's (N, 3) equality broadcast.
        bounds = torch.tensor(_E2M1_BOUNDS, dtype=dtype, device=device)
        odd = torch.tensor([1, 3, 5], device=device)
        bounds[odd] = torch.nextafter(bounds[odd], torch.full_like(bounds[odd], -1.0))
        return bounds
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=dtype, device=device)
    if name == "mx_values":
        # code 8 is -0.0: MXFP4QTensor.dequantize computes sign * value = -1 * 0.
        return torch.cat([magnitudes, -magnitudes])
    if name == "nv_values":
        # code 8 is +0.0, as in NVFP4QTensor's e2m1_values table.
        return torch.cat([magnitudes, torch.where(magnitudes == 0, 0.0, -magnitudes)])
    raise KeyError(name)


def _as_blocks(x: Tensor, block_size: int) -> Tensor:
    """(n_blocks, block_size) view of x, zero-padding the last dim to whole blocks.

    Zero padding leaves every block amax unchanged, the same as modelopt's CUDA kernels.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    remainder = x.shape[-1] % block_size
    if remainder:
        x = F.pad(x, (0, block_size - remainder))
    return x.contiguous().view(-1, block_size)


def _block_amax(blocks: Tensor) -> Tensor:
    """float32 max |x| per block, shape (n, 1); one pass, no |x| temporary."""
    low, high = torch.aminmax(blocks, dim=-1, keepdim=True)
    return torch.maximum(high, -low).float()


def _e2m1_codes(scaled: Tensor, bounds_name: str, negative: Tensor) -> Tensor:
    """4-bit E2M1 codes (sign in bit 3) as int32, from already-scaled values."""
    bounds = _table(bounds_name, scaled.device, scaled.dtype)
    codes = torch.bucketize(scaled.abs(), bounds, out_int32=True)
    return codes.add_(negative.to(torch.int32), alpha=8)


def _map_chunks(blocks: Tensor, out_dtype: torch.dtype, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a per-block fn to row chunks of `blocks`, writing into one output tensor."""
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // blocks.shape[-1])
    out: Tensor | None = None
    # max(.., 1): an empty input still runs fn once, so the output gets its shape and dtype.
    for start in range(0, max(blocks.shape[0], 1), rows_per_chunk):
        result = fn(blocks[start : start + rows_per_chunk])
        if out is None:
            out = torch.empty((blocks.shape[0], *result.shape[1:]), dtype=out_dtype, device=blocks.device)
        out[start : start + rows_per_chunk] = result
    assert out is not None
    return out


def _unblock(out_blocks: Tensor, like: Tensor, block_size: int) -> Tensor:
    """Undo _as_blocks: reshape to the padded shape and slice the padding off."""
    padded_last = -(-like.shape[-1] // block_size) * block_size
    out = out_blocks.view(*like.shape[:-1], padded_last)
    return out[..., : like.shape[-1]] if padded_last != like.shape[-1] else out


# ----------------------------------------------------------------------------------------- MXFP4


def _mx_exponent(blocks: Tensor) -> Tensor:
    """Unbiased E8M0 exponent per block (float32), exactly as MXFP4QTensor.quantize computes it."""
    return torch.ceil(torch.log2(_block_amax(blocks) / E2M1_MAX).clamp_min(-127.0))


def _e8m0_to_float(scales: Tensor) -> Tensor:
    return torch.exp2(scales.float() - E8M0_BIAS)


def _mx_codes_and_scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
    exponent = _mx_exponent(blocks)
    # Divide in x's dtype promoted with float32, as the reference does (bf16 / fp32 -> fp32).
    scaled = blocks / torch.exp2(exponent)
    # Reference sign bit is (2 - sign(x)) // 2: set for everything but x > 0, zeros included.
    codes = _e2m1_codes(scaled, "mx_bounds", ~(scaled > 0))
    return codes, (exponent + E8M0_BIAS).to(torch.uint8)


def _mx_fake_quant_blocks(blocks: Tensor) -> Tensor:
    codes, scales = _mx_codes_and_scales(blocks)
    values = _table("mx_values", blocks.device, torch.float32)[codes]
    return values.mul_(_e8m0_to_float(scales))


def _triton_ready(x: Tensor, block_size: int, use_triton: bool | None = None) -> bool:
    """Use the fused Triton kernel (engine/fp4/triton_kernel.py, same numbers) for CUDA tensors it handles."""
    if use_triton is False or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[-1] % block_size or x.numel() == 0:
        return False
    try:
        import engine.fp4.triton_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def mxfp4_fake_quant(x: Tensor, block_size: int = 32, use_triton: bool | None = None) -> Tensor:
    """MXFP4 quantize-dequantize along the last dim; same shape and dtype as x.

    On CUDA the fused Triton kernel runs (same numbers); use_triton=False forces the torch ops (for tests).
    """
    if _triton_ready(x, block_size, use_triton):
        from engine.fp4.triton_kernel import fake_quant_last_dim

        return fake_quant_last_dim(x.detach(), "mx", block_size)
    out = _map_chunks(_as_blocks(x.detach(), block_size), x.dtype, _mx_fake_quant_blocks)
    return _unblock(out, x, block_size)


def mxfp4_encode(x: Tensor, block_size: int = 32) -> tuple[Tensor, Tensor]:
    """MXFP4 encode in OpenAI's gpt-oss layout.

    Returns (blocks, scales): blocks uint8 of shape (*x.shape[:-1], n_blocks, block_size // 2),
    two E2M1 nibbles a byte, low nibble = even index (MXFP4QTensor's packing, reshaped per block);
    scales uint8 E8M0 (bias 127) of shape (*x.shape[:-1], n_blocks).
    """
    if block_size % 2 or x.shape[-1] % block_size:
        raise ValueError(
            f"mxfp4_encode needs an even block size dividing the last dim; got block {block_size}, shape {tuple(x.shape)}"
        )

    def encode(chunk: Tensor) -> Tensor:
        codes, scales = _mx_codes_and_scales(chunk)
        codes = codes.to(torch.uint8)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        # Pack the scale as one extra byte column so a single chunked pass yields both.
        return torch.cat([packed, scales], dim=1)

    out = _map_chunks(_as_blocks(x.detach(), block_size), torch.uint8, encode)
    n_blocks = x.shape[-1] // block_size
    blocks = out[:, :-1].reshape(*x.shape[:-1], n_blocks, block_size // 2)
    scales = out[:, -1].reshape(*x.shape[:-1], n_blocks)
    return blocks, scales


def mxfp4_decode(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Inverse of mxfp4_encode: (..., n_blocks, B/2) nibbles + (..., n_blocks) E8M0 -> (..., n_blocks*B)."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    half = blocks.shape[-1]
    flat = blocks.reshape(-1, half)
    codes = torch.stack([flat & 0x0F, flat >> 4], dim=-1).view(-1, 2 * half).long()
    values = _table("mx_values", blocks.device, torch.float32)[codes]
    values = values * _e8m0_to_float(scales.reshape(-1, 1))
    return values.to(dtype).view(*scales.shape[:-1], scales.shape[-1] * 2 * half)


# ----------------------------------------------------------------------------------------- NVFP4


def nvfp4_global_scale(x: Tensor, global_amax: Tensor | None = None) -> Tensor:
    """scale_2 = global_amax / (6 * 448) as a float32 scalar; global_amax defaults to max |x|."""
    if global_amax is None:
        low, high = torch.aminmax(x.detach())
        global_amax = torch.maximum(high.abs(), low.abs())
    # A per-channel amax is reduced to its max, as modelopt's dynamic kernel path does.
    scale = global_amax.detach().to(x.device).amax().float() / (E2M1_MAX * E4M3_MAX)
    # The reference divides by zero here and returns NaN; 1.0 keeps all-zero tensors at zero.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _nv_block_scale(blocks: Tensor, global_scale: Tensor) -> Tensor:
    """Dequantized per-block scale (float32, (n, 1)): fp8_e4m3(block_amax / (6 * scale_2)) * scale_2."""
    per_block = _block_amax(blocks) / (E2M1_MAX * global_scale)
    per_block = torch.where(per_block == 0, torch.ones_like(per_block), per_block)
    fp8 = per_block.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return fp8.float() * global_scale


def _nv_fake_quant_blocks(blocks: Tensor, global_scale: Tensor) -> Tensor:
    block_scale = _nv_block_scale(blocks, global_scale)
    scaled = blocks / block_scale
    codes = _e2m1_codes(scaled, "nv_bounds", scaled < 0)
    values = _table("nv_values", blocks.device, torch.float32)[codes]
    return values.mul_(block_scale)


def nvfp4_fake_quant(
    x: Tensor, block_size: int = 16, global_amax: Tensor | None = None, use_triton: bool | None = None
) -> Tensor:
    """NVFP4 quantize-dequantize along the last dim; same shape and dtype as x.

    global_amax: the quantizer's calibrated per-tensor amax; None uses max |x| (modelopt's fallback).
    """
    if x.numel() == 0:  # no amax to take; modelopt's quantizer skips empty inputs the same way
        return x.detach().clone()
    global_scale = nvfp4_global_scale(x, global_amax)
    if _triton_ready(x, block_size, use_triton):
        from engine.fp4.triton_kernel import fake_quant_last_dim

        return fake_quant_last_dim(x.detach(), "nv", block_size, global_scale)
    blocks = _as_blocks(x.detach(), block_size)
    out = _map_chunks(blocks, x.dtype, functools.partial(_nv_fake_quant_blocks, global_scale=global_scale))
    return _unblock(out, x, block_size)


def nvfp4_decode(packed: Tensor, scales: Tensor, scale_2: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """NVFP4 codes back to values along the last dim, as `NVFP4QTensor.dequantize` computes them (float32).

    packed (..., n/2) uint8, two E2M1 codes a byte, low nibble = even element; scales (..., n/B) float8_e4m3fn;
    scale_2 the float32 per-tensor scale. Value = e2m1 * (float(scale) * scale_2): the same product, in the same
    order, as `_nv_fake_quant_blocks`, so the decoded export equals the fake-quant weights exactly (in float32;
    scale_2 is arbitrary, so a bf16 result would round). Done here in torch rather than through modelopt so that a
    process serving a checkpoint (the web app) need not import modelopt; tests/test_export.py checks it against
    modelopt's reference. Row chunks keep the int64/float32 temporaries of a large expert tensor small.
    """
    if packed.dtype != torch.uint8 or packed.shape[:-1] != scales.shape[:-1] or (2 * packed.shape[-1]) % scales.shape[-1]:
        raise ValueError(f"NVFP4 codes {tuple(packed.shape)} {packed.dtype} and block scales {tuple(scales.shape)} "
                         "do not fit together (want uint8 (..., n/2) and (..., n/B))")
    half, n_blocks = packed.shape[-1], scales.shape[-1]
    block = 2 * half // n_blocks
    global_scale = scale_2.detach().float().reshape(()).to(packed.device)
    table = _table("nv_values", packed.device, torch.float32)
    flat_codes, flat_scales = packed.reshape(-1, half), scales.reshape(-1, n_blocks)
    out = torch.empty((flat_codes.shape[0], 2 * half), dtype=dtype, device=packed.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (2 * half))
    for start in range(0, flat_codes.shape[0], rows_per_chunk):
        chunk = flat_codes[start : start + rows_per_chunk]
        codes = torch.stack([chunk & 0x0F, chunk >> 4], dim=-1).view(chunk.shape[0], 2 * half).long()
        block_scale = flat_scales[start : start + rows_per_chunk].float() * global_scale
        values = table[codes].view(chunk.shape[0], n_blocks, block) * block_scale.unsqueeze(-1)
        out[start : start + rows_per_chunk] = values.view(chunk.shape[0], 2 * half)
    return out.view(*packed.shape[:-1], 2 * half)


# ------------------------------------------------------------------------------ modelopt backend


class _StraightThrough(torch.autograd.Function):
    """Forward = fake quant; backward = identity, or modelopt's clipped STE when asked.

    Nothing is saved for pure STE (modelopt's default pass_through_bwd=True, and always for MX).
    The clipped variant saves a reference to the input itself, never a copy.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, quantize: Callable[[Tensor], Tensor], clip_amax: Tensor | None):
        if clip_amax is not None:
            ctx.save_for_backward(inputs, clip_amax)
        return quantize(inputs)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not ctx.saved_tensors:
            return grad_output, None, None
        inputs, amax = ctx.saved_tensors
        # Same rule as modelopt's _fake_tensor_quant_backward: zero the grad of clipped outliers.
        return torch.where(inputs.abs() <= amax, grad_output, torch.zeros_like(grad_output)), None, None


def _block_size_of(quantizer, inputs: Tensor) -> int:
    block_sizes = quantizer.block_sizes
    axes = {k: v for k, v in block_sizes.items() if isinstance(k, int)}
    last_dim_keys = {-1, inputs.dim() - 1}
    block_size = block_sizes.get(-1) or block_sizes.get(inputs.dim() - 1)
    if not block_size or set(axes) - last_dim_keys:
        raise NotImplementedError(f"{BACKEND_NAME}: only last-dim block quantization is supported, got {block_sizes}")
    return int(block_size)


def _check_supported(quantizer) -> str:
    """Return "mx" or "nv" for the quantizer's config, or raise NotImplementedError naming it."""
    block_sizes = quantizer.block_sizes
    config = f"num_bits={quantizer.num_bits}, block_sizes={block_sizes}"
    num_bits = quantizer.num_bits
    if not isinstance(num_bits, (tuple, list)) or tuple(num_bits) != E2M1_BITS:
        raise NotImplementedError(f"{BACKEND_NAME} supports E2M1 (num_bits=(2, 1)) only; got {config}")
    if not isinstance(block_sizes, dict) or block_sizes.get("type") != "dynamic":
        raise NotImplementedError(f"{BACKEND_NAME} supports dynamic block quantization only; got {config}")
    unsupported = {"scale_block_sizes", "four_over_six"} & {k for k, v in block_sizes.items() if v}
    if unsupported:
        raise NotImplementedError(f"{BACKEND_NAME} does not support {sorted(unsupported)}; got {config}")
    if getattr(quantizer, "bias_calibrator", None) is not None:
        raise NotImplementedError(f"{BACKEND_NAME} does not support quantizer bias; got {config}")
    scale_bits = tuple(block_sizes.get("scale_bits") or ())
    if scale_bits == MX_SCALE_BITS:
        return "mx"
    if scale_bits == NV_SCALE_BITS:
        return "nv"
    raise NotImplementedError(f"{BACKEND_NAME} supports scale_bits (8, 0) or (4, 3); got {config}")


def fake_quant(inputs: Tensor, quantizer) -> Tensor:
    """modelopt backend entrypoint: fake-quantize `inputs` as `quantizer`'s config asks."""
    kind = _check_supported(quantizer)
    block_size = _block_size_of(quantizer, inputs)
    if kind == "mx":
        # MX has no amax in modelopt (amax None, pass-through grad): plain STE.
        quantize = functools.partial(mxfp4_fake_quant, block_size=block_size)
        return _StraightThrough.apply(inputs, quantize, None)
    # The calibrated per-tensor `_amax` if present, else max |inputs| - modelopt's own _get_amax.
    amax = quantizer._get_amax(inputs)
    quantize = functools.partial(nvfp4_fake_quant, block_size=block_size, global_amax=amax)
    clip_amax = None if getattr(quantizer, "_pass_through_bwd", True) else amax
    return _StraightThrough.apply(inputs, quantize, clip_amax)


def register() -> None:
    """Register `fake_quant` as modelopt backend BACKEND_NAME (idempotent, no overwrite warning)."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    from engine.fp4.import_leaks import drop_pulp_import_tracebacks

    drop_pulp_import_tracebacks()  # the import above may be modelopt's first: see engine/fp4/import_leaks.py
    if not is_registered_quant_backend(BACKEND_NAME):
        register_quant_backend(BACKEND_NAME, fake_quant)
