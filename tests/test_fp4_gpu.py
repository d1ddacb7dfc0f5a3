"""GPU cross-check of engine/fp4/torch_backend.py: the reference QTensors (must be bit-exact) and modelopt's kernels.

Run on a CUDA machine: `FP4_GPU_REPORT=fp4_gpu.json python -m pytest -m gpu tests/test_fp4_gpu.py -s`.
What `mtq.quantize` runs on CUDA differs from the reference QTensors that modelopt exports with.
Those differences are counted per cause, asserted to be the only ones ("unexplained" must be 0),
printed, written as JSON to $FP4_GPU_REPORT, and surfaced as XFAIL with the counts in the reason:
- MX CUDA extension: E2M1 ties to even (reference: ties down), E8M0 exponent from float bits
  (reference: float32 log2, which rounds), sign of zero.
- NVFP4 via the MX CUDA extension (no Triton): see classify_nv_cuda_ext.
- NVFP4 Triton kernel (sm >= 8.9): block 16 whatever the config says, no 2**-9 clamp of the FP8
  block scale and block scales < 1e-5 replaced by 1.0, -0.0 for negatives rounding to zero, and
  an fp32 division that is not correctly rounded, so a quotient exactly on an E2M1 midpoint can
  come out one ulp low and round down instead of to even (seen on H100).
"""

import json
import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qat_studio/torch_extensions"))
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from modelopt.torch.quantization import tensor_quant
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from test_fp4 import assert_bit_equal, bits, crafted_cases, random_weights, ref_mx, ref_nv

from engine.fp4 import torch_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

GPT_OSS_20B_EXPERTS = (32, 5760, 2880)  # gate_up_proj as modelopt quantizes it: (experts, out, in)
SLICE = 4  # experts per slice when running the memory-hungry reference classes
REPORT: dict[str, dict] = {}


def cases() -> dict[str, tuple]:
    specs = {
        # Columns spread over 2**-12..2**12: many scales, and many blocks tiny next to the global amax.
        "gpt_oss_20b_bf16": (GPT_OSS_20B_EXPERTS, torch.bfloat16),
        # N(0, 0.02): what trained weights look like; isolates the block-size finding.
        "gpt_oss_20b_normal_bf16": (GPT_OSS_20B_EXPERTS, torch.bfloat16, 0.02),
        "random_fp32": ((8, 512, 256), torch.float32),
    }
    specs.update({f"{name}_{dt}": (name, dt) for name in crafted_cases(32) for dt in ("bf16", "fp32")})
    return specs


CASES = cases()


def make_input(case: str) -> torch.Tensor:
    spec, dtype, *std = CASES[case]
    if std:
        gen = torch.Generator(device="cuda").manual_seed(1)
        return (torch.randn(spec, generator=gen, device="cuda", dtype=torch.float32) * std[0]).to(dtype)
    if isinstance(spec, tuple):
        return random_weights(spec, dtype, seed=1).cuda()
    return crafted_cases(32)[spec].to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).cuda()


def reference(fmt: str, x: torch.Tensor, block: int, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """The reference QTensor round trip, run a few experts at a time to bound its memory."""
    if fmt == "nv" and global_amax is None:
        global_amax = x.abs().amax().float()  # what NVFP4QTensor computes on the whole tensor
    parts = [
        ref_mx(part, block) if fmt == "mx" else ref_nv(part, block, global_amax)
        for part in torch.split(x, SLICE if x.dim() == 3 else x.shape[0])
    ]
    return torch.cat(parts)


def modelopt_quantizer(scale_bits: tuple, block: int, amax: torch.Tensor | None = None) -> TensorQuantizer:
    """A TensorQuantizer as mtq.quantize builds it, without our backend: modelopt's own CUDA path."""
    cfg = QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: block, "type": "dynamic", "scale_bits": scale_bits})
    quantizer = TensorQuantizer(cfg).cuda()
    if amax is not None:
        quantizer.amax = amax
    return quantizer


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "modelopt": __import__("modelopt").__version__,
        "results": REPORT,
    }
    print("\nFP4 GPU cross-check:\n" + json.dumps(summary, indent=1))
    if os.environ.get("FP4_GPU_REPORT"):
        with open(os.environ["FP4_GPU_REPORT"], "w") as f:
            json.dump(summary, f, indent=1)


def record(key: str, counts: dict) -> None:
    REPORT[key] = counts
    assert counts.get("unexplained", 0) == 0, f"{key}: differences with no documented cause: {counts}"
    documented = {k: v for k, v in counts.items() if k not in ("elements", "unexplained") and v}
    if documented:
        pytest.xfail(f"{key}: documented modelopt kernel differences (elements): {documented}")


def block_view(t: torch.Tensor, block: int) -> torch.Tensor:
    return t.reshape(-1, block)


# ---------------------------------------------------------------- our backend vs the reference, on GPU


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt, block", [("mx", 32), ("mx", 16), ("nv", 32), ("nv", 16)])
def test_ours_bit_exact_with_reference_qtensor_on_gpu(case, fmt, block):
    x = make_input(case)
    ours = torch_backend.mxfp4_fake_quant(x, block) if fmt == "mx" else torch_backend.nvfp4_fake_quant(x, block)
    assert ours.is_cuda
    assert_bit_equal(ours, reference(fmt, x, block))
    if x.numel() < 1 << 20:  # same code on CPU: float32 log2 may differ between devices, so record it
        on_cpu = torch_backend.mxfp4_fake_quant(x.cpu(), block) if fmt == "mx" else torch_backend.nvfp4_fake_quant(x.cpu(), block)
        where = (bits(on_cpu) != bits(ours.cpu())).nonzero()[:4].tolist()
        REPORT[f"cpu_vs_gpu/{fmt}{block}/{case}"] = {
            "mismatches": int((bits(on_cpu) != bits(ours.cpu())).sum()),
            "examples (index, x, cpu, gpu)": [(i, x[tuple(i)].item(), on_cpu[tuple(i)].item(), ours[tuple(i)].item()) for i in where],
        }


def test_encode_decode_on_gpu_matches_fake_quant():
    x = make_input("gpt_oss_20b_bf16")[:2]
    blocks, scales = torch_backend.mxfp4_encode(x, 32)
    assert blocks.is_cuda and scales.is_cuda
    assert_bit_equal(torch_backend.mxfp4_decode(blocks, scales, torch.bfloat16), torch_backend.mxfp4_fake_quant(x, 32))


# ------------------------------------------------------------------- modelopt's MX CUDA extension


def kernel_e8m0_exponent(blocks: torch.Tensor) -> torch.Tensor:
    """compute_scale_e8m0_NV of tensor_quant_mx.cu: exact ceil(log2(amax / 6)) from the float bits."""
    ratio = torch_backend._block_amax(blocks) / 6.0
    ratio_bits = ratio.view(torch.int32)
    exp_field, mantissa = (ratio_bits >> 23) & 0xFF, ratio_bits & 0x7FFFFF
    round_up = (mantissa > 0) & (exp_field != 0xFE) & ~((exp_field == 0) & (mantissa <= 0x400000))
    return torch.where(round_up, exp_field - 126, exp_field - 127).float()


def classify_mx(kernel: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, block: int) -> dict:
    counts = {"elements": 0, "e8m0_exponent": 0, "tie_rounding": 0, "signed_zero": 0, "unexplained": 0}
    for k, r, xs in zip(*(torch.split(t, SLICE) for t in (kernel, ref, x))):
        k, r, blocks = block_view(k, block), block_view(r, block), block_view(xs, block)
        diff = bits(k) != bits(r)
        exponent = torch_backend._mx_exponent(blocks)
        exponent_differs = (kernel_e8m0_exponent(blocks) != exponent).expand_as(diff)
        scaled = (blocks / torch.exp2(exponent)).abs()
        at_odd_midpoint = (scaled == 0.75) | (scaled == 1.75) | (scaled == 3.5)
        signed_zero = (k == 0) & (r == 0)
        counts["elements"] += k.numel()
        counts["e8m0_exponent"] += int((diff & exponent_differs).sum())
        counts["tie_rounding"] += int((diff & ~exponent_differs & at_odd_midpoint).sum())
        counts["signed_zero"] += int((diff & ~exponent_differs & signed_zero).sum())
        counts["unexplained"] += int((diff & ~exponent_differs & ~at_odd_midpoint & ~signed_zero).sum())
    return counts


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block", [32, 16])
def test_modelopt_mx_cuda_kernel_vs_reference(case, block):
    x = make_input(case)
    via_quantizer = modelopt_quantizer((8, 0), block)(x)
    raw = tensor_quant.dynamic_block_quant(x, block, None, None, (2, 1), (8, 0))
    assert_bit_equal(via_quantizer, raw)  # mtq's quantizer path is exactly the raw kernel
    record(f"mx_cuda_ext/block{block}/{case}", classify_mx(raw, reference("mx", x, block), x, block))


# --------------------------------------------------------------------- modelopt's NVFP4 kernels


def near_e2m1_midpoint(quotient: torch.Tensor) -> torch.Tensor:
    """|x / scale| (correctly rounded) within 4 ulp of an E2M1 rounding midpoint."""
    q = quotient.abs()
    return torch.stack([(q - b).abs() <= b * 2.0**-21 for b in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)]).any(0)


def classify_nv(kernel: torch.Tensor, x: torch.Tensor, global_amax: torch.Tensor, config_block: int) -> dict:
    """Attribute differences from the config-block reference: block 16 first, then per-16-block causes."""
    ref_config = reference("nv", x, config_block, global_amax)
    ref_16 = reference("nv", x, 16, global_amax)
    global_scale = torch_backend.nvfp4_global_scale(x, global_amax)
    counts = {"elements": x.numel(), "block_16_not_config_block": 0, "signed_zero": 0, "small_block_scale": 0,
              "division_at_midpoint": 0, "unexplained": 0}
    for k, rc, r16, xs in zip(*(torch.split(t, SLICE) for t in (kernel, ref_config, ref_16, x))):
        k, r16, blocks = block_view(k, 16), block_view(r16, 16), block_view(xs, 16)
        diff_config = (bits(k) != bits(rc).reshape(k.shape)) & ~((k == 0) & (rc.reshape(k.shape) == 0))
        diff_16 = bits(k) != bits(r16)
        counts["block_16_not_config_block"] += int((diff_config & ~diff_16).sum())
        signed_zero = diff_16 & (k == 0) & (r16 == 0)
        per_block = torch_backend._block_amax(blocks) / (6.0 * global_scale)
        small = ((per_block < 2**-9) | (torch_backend._nv_block_scale(blocks, global_scale) < 1e-5)).expand_as(k)
        counts["signed_zero"] += int(signed_zero.sum())
        counts["small_block_scale"] += int((diff_16 & ~signed_zero & small).sum())
        midpoint = near_e2m1_midpoint(blocks / torch_backend._nv_block_scale(blocks, global_scale)) & ~small
        counts["division_at_midpoint"] += int((diff_16 & ~signed_zero & midpoint).sum())
        unexplained = diff_16 & ~signed_zero & ~small & ~midpoint
        counts["unexplained"] += int(unexplained.sum())
        if unexplained.any() and "examples" not in counts:
            counts["examples"] = nv_examples(unexplained, blocks, k, r16, global_scale)
    return counts


def nv_examples(mask: torch.Tensor, blocks: torch.Tensor, kernel: torch.Tensor, ref: torch.Tensor, global_scale) -> list:
    """A few differing elements with the numbers needed to see why (for the JSON report)."""
    rows, cols = mask.nonzero()[:5].unbind(-1)
    per_block = torch_backend._block_amax(blocks[rows]) / (6.0 * global_scale)
    block_scale = torch_backend._nv_block_scale(blocks[rows], global_scale)
    return [
        {"x": blocks[r, c].item(), "kernel": kernel[r, c].item(), "reference": ref[r, c].item(),
         "per_block_scale": pb.item(), "fp8_block_scale": (bs / global_scale).item(),
         "x_over_scale": (blocks[r, c].float() / bs).item()}
        for r, c, pb, bs in zip(rows, cols, per_block.flatten(), block_scale.flatten())
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_modelopt_nvfp4_triton_kernel_vs_reference(case):
    if not hasattr(tensor_quant.triton_kernel, "fp4_fake_quant_block"):
        pytest.skip("modelopt's NVFP4 Triton kernel needs triton and compute capability >= 8.9")
    x = make_input(case)
    global_amax = x.abs().amax().float()  # what max calibration stores in _amax
    via_quantizer = modelopt_quantizer((4, 3), 32, global_amax)(x)  # NVFP4_MLP_WEIGHT_ONLY_CFG: block 32
    raw = tensor_quant.dynamic_block_quant(x, 32, global_amax, None, (2, 1), (4, 3))
    assert_bit_equal(via_quantizer, raw)
    record(f"nv_triton/config_block32/{case}", classify_nv(raw, x, global_amax, 32))


def classify_nv_cuda_ext(kernel: torch.Tensor, x: torch.Tensor, global_amax: torch.Tensor, block: int) -> dict:
    """modelopt's NVFP4 path through the MX CUDA extension (tensor_quant_mx.cu, built with --use_fast_math) against
    NVFP4QTensor, each difference put down to one cause read off the kernel's source:
    - signed_zero: both zero, signs differ. quantize() leaves its `int sign` uninitialised when x == 0, and gives
      -0.0 to negatives that round to zero (the reference: +0.0).
    - small_block_scale: the block's FP8 scale is below E4M3's smallest subnormal, 2**-9 (or the reference's block
      scale < 1e-5): the kernel lets the E4M3 cast round it (to 0 or a subnormal), the reference clamps it.
    - block_scale_ulp: same E4M3 code, but the kernel decodes the block scale as q8 / (448 * 6 / global_amax) in
      double, rounded once, the reference as q8 * (global_amax / 2688) in float: one ulp apart, so outputs are too.
    - huge_global_amax: global_amax > 2**126: fast-math's division 6 / global_amax returns 0 there, the scale
      becomes 0 / 0 and every output NaN.
    Anything else is "unexplained" and fails the test. A CPU emulation of the kernel reproduced the H100's counts
    of docs/results/fp4_gpu_h100.json exactly for random_fp32 (68,886 values, 158,476 signed zeros) and the crafted
    cases' value counts (ties 22, mixed_fp32 28); the gpt-oss-sized cases were too large to emulate on CPU."""
    global_scale = torch_backend.nvfp4_global_scale(x, global_amax)
    counts = {"elements": x.numel(), "signed_zero": 0, "small_block_scale": 0, "block_scale_ulp": 0,
              "huge_global_amax": 0, "unexplained": 0}
    huge = bool(global_amax > 2.0**126)
    two_level = 448.0 * (6.0 / global_amax.float()).double()
    for k, r, xs in zip(*(torch.split(t, SLICE) for t in (kernel, reference("nv", x, block, global_amax), x))):
        k, r, blocks = block_view(k, block), block_view(r, block), block_view(xs, block)
        diff = bits(k) != bits(r)
        if huge:
            counts["huge_global_amax"] += int(diff.sum())
            continue
        signed_zero = diff & (k == 0) & (r == 0)
        per_block = torch_backend._block_amax(blocks) / (6.0 * global_scale)
        ref_scale = torch_backend._nv_block_scale(blocks, global_scale)
        small = ((per_block < 2**-9) | (ref_scale < 1e-5)).expand_as(k)
        code = ((torch_backend._block_amax(blocks) / 6.0).double() * two_level).float().to(torch.float8_e4m3fn)
        ulp = ((code.double() / two_level).float() != ref_scale).expand_as(k)
        value = diff & ~signed_zero
        counts["signed_zero"] += int(signed_zero.sum())
        counts["small_block_scale"] += int((value & small).sum())
        counts["block_scale_ulp"] += int((value & ~small & ulp).sum())
        counts["unexplained"] += int((value & ~small & ~ulp).sum())
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_modelopt_nvfp4_cuda_ext_vs_reference(case, monkeypatch):
    """The path modelopt takes for NVFP4 without the Triton kernel (e.g. sm < 8.9); honours the block size. XFAIL
    only when every difference has one of classify_nv_cuda_ext's causes; any other difference fails."""
    monkeypatch.setattr(tensor_quant, "DISABLE_TRITON_KERNEL", True)
    x = make_input(case)
    global_amax = x.abs().amax().float()
    raw = tensor_quant.dynamic_block_quant(x, 32, global_amax, None, (2, 1), (4, 3))
    record(f"nv_cuda_ext/block32/{case}", classify_nv_cuda_ext(raw, x, global_amax, 32))


def test_speed_report():
    """Record (no assert) how long each implementation takes on one gpt-oss-20b expert tensor."""
    x = make_input("gpt_oss_20b_normal_bf16")
    amax = x.abs().amax().float()
    candidates = {
        "ours_mxfp4": lambda: torch_backend.mxfp4_fake_quant(x, 32),
        "ours_nvfp4": lambda: torch_backend.nvfp4_fake_quant(x, 32, amax),
        "modelopt_mx_cuda_ext": lambda: tensor_quant.dynamic_block_quant(x, 32, None, None, (2, 1), (8, 0)),
        "modelopt_nvfp4_triton_block16": lambda: tensor_quant.dynamic_block_quant(x, 32, amax, None, (2, 1), (4, 3)),
    }
    timings = {}
    for name, fn in candidates.items():
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        timings[name] = round(start.elapsed_time(end) / 3, 2)
    REPORT[f"speed_ms/{tuple(x.shape)}_bf16"] = timings
