"""Fused FP4 fake quant for CUDA (Triton): the numbers of engine/fp4/torch_backend.py at the speed of a copy.

engine/fp4/torch_backend.py is bit-exact to modelopt's reference MXFP4QTensor / NVFP4QTensor but runs as ~20 separate torch
ops (29 ms for one (32, 5760, 2880) bf16 gpt-oss-20b expert tensor on an H100). This is the same arithmetic in one
kernel: one read of the weight, one write of the fake-quantized copy, no float32 temporaries.

Blocks run along dim 1 of a (B, K, N) view given by strides, so the kernel reads gpt-oss expert weights where they
are: (E, in, out) with blocks along `in` (what modelopt's wrapper gets through a transpose + contiguous copy), and it
can write its output in any layout.

Bit-exactness with the torch version on CUDA needs the same fp32 operations, not just the same formula:
- amax / 6 and amax / 2688 are, in PyTorch on CUDA, a multiply by the fp32 reciprocal (its `tensor / python
  scalar` path); we multiply by the same reciprocal;
- log2 is libdevice's log2f (what torch.log2 calls), not Triton's approximate tl.log2;
- amax / (6 * scale_2) and x / block_scale (NVFP4) are IEEE divisions (tl.div_rn), not Triton's approximate `/`;
- MXFP4 scales are powers of two, so x / 2**e == x * 2**-e exactly.
tests/test_fp4_gpu.py checks every element against engine/fp4/torch_backend.py and modelopt's QTensors on the GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pow2(e):
    """2**e for integer-valued float e in [-127, 127], built from the bits: exact, subnormal 2**-127 included
    (a hardware exp2 may flush it to zero)."""
    e_int = e.to(tl.int32)
    bits = tl.where(e_int >= -126, (e_int + 127) << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(v):
    """Round fp32 v in [2**-9, 448] to the nearest float8_e4m3fn value, ties to even (as torch's cast does).

    Plain fp32 integer arithmetic rather than a hardware fp8 conversion, so the rounding is the same everywhere
    (Triton's CPU interpreter rounds some values across a binade wrongly).
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # keep 3 of the 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 == ~0xFFFFF
    subnormal = ((v * 512.0 + 8388608.0) - 8388608.0) * 0.001953125  # below 2**-6: multiples of 2**-9, RNE
    return tl.where(v < 0.015625, subnormal, normal)


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest bfloat16 value (ties to even), still as fp32. Finite inputs only."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True)  # -65536 == ~0xFFFF


@triton.jit
def _e2m1_magnitude_mx(a):
    """|x|/scale -> E2M1 magnitude, ties to the smaller value (MXFP4QTensor counts bounds strictly below)."""
    return tl.where(a > 5.0, 6.0, tl.where(a > 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a > 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a > 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))


@triton.jit
def _e2m1_magnitude_nv(a):
    """|x|/scale -> E2M1 magnitude, ties to even (NVFP4QTensor bumps 0.75, 1.75 and 3.5 up)."""
    return tl.where(a > 5.0, 6.0, tl.where(a >= 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a >= 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a >= 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))


@triton.jit
def _fp4_fake_quant_kernel(
    x_ptr, y_ptr, global_scale_ptr,
    K, N,
    sx_b, sx_k, sx_n, sy_b, sy_k, sy_n,
    IS_NV: tl.constexpr, BLOCK: tl.constexpr, TILE_N: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    x_ptrs = x_ptr + pid_b * sx_b + offs_k[:, None] * sx_k + offs_n[None, :] * sx_n
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)  # one amax per column = per block of BLOCK values along K
    if IS_NV:
        global_scale = tl.load(global_scale_ptr)
        per_block = tl.div_rn(amax, 6.0 * global_scale)
        per_block = tl.where(per_block == 0.0, 1.0, per_block)
        per_block = tl.minimum(tl.maximum(per_block, 0.001953125), 448.0)  # [2**-9, 448], then E4M3
        scale = _round_to_e4m3(per_block) * global_scale
        scaled = tl.div_rn(x, scale[None, :])
        magnitude = _e2m1_magnitude_nv(tl.abs(scaled))
        # NVFP4QTensor: sign bit only for x < 0, and its code 8 decodes to +0.0.
        value = tl.where((scaled < 0.0) & (magnitude > 0.0), magnitude * -1.0, magnitude)
        y = value * scale[None, :]
    else:
        # amax * fp32(1/6): PyTorch's CUDA `tensor / 6.0` multiplies by the reciprocal
        descale = amax * 0.16666666666666666
        if LIBDEVICE:  # log2f, as torch.log2 computes it; Triton's tl.log2 is the approximate lg2 instruction
            log2 = libdevice.log2(descale)
        else:  # Triton's CPU interpreter (tests without a GPU) has no libdevice; numpy's log2 stands in
            log2 = tl.log2(descale)
        exponent = tl.ceil(tl.maximum(log2, -127.0))
        scaled = x * _pow2(-exponent)[None, :]
        magnitude = _e2m1_magnitude_mx(tl.abs(scaled))
        # MXFP4QTensor: sign bit for everything but x > 0, so exact zeros come back as -0.0.
        # (magnitude * -1.0, not -magnitude: Triton negates as 0 - x, which turns -0.0 into +0.0)
        value = tl.where(scaled > 0.0, magnitude, magnitude * -1.0)
        y = value * _pow2(exponent)[None, :]
    y_ptrs = y_ptr + pid_b * sy_b + offs_k[:, None] * sy_k + offs_n[None, :] * sy_n
    if y_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_to_bf16(y)  # now exactly representable, so the store's cast cannot round differently
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def fake_quant_3d(
    x: torch.Tensor, kind: str, block_size: int, global_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None, tile_n: int = 64,
) -> torch.Tensor:
    """Fake-quantize a 3-D tensor with blocks along dim 1. kind: 'mx' or 'nv' (global_scale = amax / 2688, fp32).

    `out` may have any strides (e.g. a transposed view), so the result can be laid out as the next matmul wants.
    """
    if x.dim() != 3:
        raise ValueError(f"fake_quant_3d needs a 3-D tensor, got shape {tuple(x.shape)}")
    B, K, N = x.shape
    if K % block_size:
        raise ValueError(f"block size {block_size} does not divide dim 1 ({K})")
    if out is None:
        out = torch.empty_like(x)
    if kind == "nv":
        if global_scale is None:
            raise ValueError("NVFP4 needs the global scale (amax / (6 * 448))")
        scale_arg = global_scale.reshape(1).to(device=x.device, dtype=torch.float32)
    else:
        scale_arg = x  # unused by the MX branch; any pointer will do
    grid = (B, K // block_size, triton.cdiv(N, tile_n))
    _fp4_fake_quant_kernel[grid](
        x, out, scale_arg, K, N, *x.stride(), *out.stride(),
        IS_NV=(kind == "nv"), BLOCK=block_size, TILE_N=tile_n, LIBDEVICE=not _INTERPRETED,
    )
    return out


def fake_quant_last_dim(x: torch.Tensor, kind: str, block_size: int, global_scale: torch.Tensor | None = None):
    """Blocks along the last dim of any tensor (the modelopt backend's calling convention)."""
    if x.shape[-1] % block_size:
        raise ValueError(f"block size {block_size} does not divide the last dim ({x.shape[-1]})")
    flat = x.reshape(-1, x.shape[-1])
    # (rows, L) seen as (1, L, rows): dim 1 (blocked) is the contiguous last dim.
    out = fake_quant_3d(flat.t().unsqueeze(0), kind, block_size, global_scale)
    return out.squeeze(0).t().reshape(x.shape)
