"""engine/fp4/torch_backend.py: bit-exact against modelopt's reference QTensors, and QAT through mtq.quantize on CPU.

Signed zeros: we require the sign of zero to match too (bit patterns, not values). It is free to
match, and it pins down the reference's rules exactly: MXFP4QTensor encodes exact zeros with the
sign bit set (they come back as -0.0, and the exporter writes nibble 0b1000), NVFP4QTensor maps
every zero code to +0.0. A value-level comparison would hide a wrong sign-bit rule in the encoder.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import warnings

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.qtensor import MXFP4QTensor, NVFP4QTensor
from transformers import GptOssConfig, GptOssForCausalLM

from engine.fp4 import torch_backend

BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
TIES_DOWN = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # MXFP4QTensor: strict '>' against each bound
TIES_EVEN = (0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0)  # NVFP4QTensor: round half to even


def ref_mx(x: torch.Tensor, block: int) -> torch.Tensor:
    q, scale = MXFP4QTensor.quantize(x.clone(), block)
    return q.dequantize(dtype=x.dtype, scale=scale, block_sizes={-1: block})


def ref_nv(x: torch.Tensor, block: int, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    scale_2 = None if global_amax is None else global_amax.float() / (6.0 * 448.0)
    q, scale, scale_2 = NVFP4QTensor.quantize(x.clone(), block, weights_scaling_factor_2=scale_2)
    return q.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: block})


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    diff = bits(ours) != bits(ref)
    assert not diff.any(), f"{int(diff.sum())} mismatches, first at {diff.nonzero()[0].tolist()}"


def random_weights(shape, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Per-column magnitudes over 2**-12..2**12 so blocks exercise many E8M0 / FP8 scales.
    spread = torch.exp2(torch.linspace(-12, 12, shape[-1]))
    return (torch.randn(shape, generator=gen) * spread).to(dtype)


def crafted_cases(block: int) -> dict[str, torch.Tensor]:
    """Rows of 2 blocks each (float32; the tests cast them)."""
    def row(*values):
        r = torch.zeros(2 * block)
        r[: len(values)] = torch.tensor(values, dtype=torch.float64).float()
        r[block : block + len(values)] = -r[: len(values)]
        return r

    ties = [row(6 * 2.0**k, *[b * 2.0**k for b in BOUNDS], *[-b * 2.0**k for b in BOUNDS]) for k in (-9, -3, 0, 5, 20)]
    zeros = torch.zeros(3, 2 * block)
    zeros[1] = -0.0
    zeros[2, ::2] = -0.0
    normal = torch.linspace(-3, 3, 2 * block)
    # amax one float32 ulp above 6 * 2**k: float32 log2(amax / 6) rounds to k, so the reference's
    # E8M0 exponent is k (the exact ceil is k + 1) and amax saturates to 6 * 2**k.
    just_above = [torch.nextafter(torch.tensor(6 * 2.0**k), torch.tensor(float("inf"))).item() for k in (10, 20, -20)]
    return {
        "ties": torch.stack(ties),
        "zeros": torch.cat([zeros, normal[None]]),
        "huge": torch.stack([row(1e30, 1.0, -2e29, 0.5), row(3.3895e38, -1e38, 1.0), normal]),
        "bf16_max": torch.stack([row(torch.finfo(torch.bfloat16).max, 1e37, -3.0)]),
        "tiny": torch.stack([row(1e-40, 2.0**-130, -(2.0**-130), 0.0, -0.0), row(1e-40, 1.0, 2.0**-130)]),
        "mixed": random_weights((3, 2 * block), torch.float32, seed=3) * torch.tensor([1.0, -1.0]).repeat(block),
        "log2_edge": torch.stack([row(a, a / 6, -a / 2, a / 12) for a in just_above]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape", [(4, 256, 128), (64, 96)])
def test_random_tensors_match_reference(dtype, block, shape):
    x = random_weights(shape, dtype)
    assert_bit_equal(torch_backend.mxfp4_fake_quant(x, block), ref_mx(x, block))
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, block), ref_nv(x, block))
    # A calibrated global amax below the tensor's own: saturating blocks must match too.
    amax = x.abs().amax().float() / 3
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, block, amax), ref_nv(x, block, amax))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("case", ["ties", "zeros", "huge", "bf16_max", "tiny", "mixed", "log2_edge"])
def test_crafted_blocks_match_reference(dtype, block, case):
    x = crafted_cases(block)[case].to(dtype)
    assert_bit_equal(torch_backend.mxfp4_fake_quant(x, block), ref_mx(x, block))
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, block), ref_nv(x, block))


def test_all_crafted_blocks_in_one_tensor_match_reference():
    # One tensor: the huge rows set the NVFP4 global scale, so the tiny/tie blocks hit the 2**-9 clamp.
    x = torch.cat(list(crafted_cases(32).values()))
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, 32), ref_nv(x, 32))
    assert_bit_equal(torch_backend.mxfp4_fake_quant(x, 32), ref_mx(x, 32))


@pytest.mark.parametrize("k", [-20, -1, 0, 7])
def test_mxfp4_ties_go_to_smaller_magnitude(k):
    scale = 2.0**k
    x = torch.zeros(32)
    x[0] = 6 * scale  # amax / 6 = 2**k exactly, so the E8M0 scale is 2**k
    x[1:8] = torch.tensor(BOUNDS) * scale
    x[8:15] = -torch.tensor(BOUNDS) * scale
    out = torch_backend.mxfp4_fake_quant(x, 32)
    assert out[1:8].tolist() == [v * scale for v in TIES_DOWN]
    assert out[8:15].tolist() == [-v * scale for v in TIES_DOWN]


def test_mxfp4_scale_uses_float32_log2_like_the_reference():
    amax = torch.nextafter(torch.tensor(6144.0), torch.tensor(7000.0))  # 6 * 2**10, plus one ulp
    x = torch.cat([amax[None], torch.zeros(31)])
    blocks, scales = torch_backend.mxfp4_encode(x, 32)
    assert scales.item() == 127 + 10  # not 11: log2(amax / 6) rounds to exactly 10.0 in float32
    assert torch_backend.mxfp4_fake_quant(x, 32)[0].item() == 6144.0  # so amax saturates to 6 * 2**10


@pytest.mark.parametrize("j, m", [(0, 0), (3, 10), (-5, 4), (8, -3)])
def test_nvfp4_ties_go_to_even(j, m):
    # global amax 2688 * 2**-m makes scale_2 = 2**-m; block amax 6 * 2**(j-m) makes the FP8 block
    # scale 2**j exactly, so x / scale lands exactly on the E2M1 midpoints.
    global_amax = torch.tensor(2688.0 * 2.0**-m)
    scale = 2.0 ** (j - m)
    x = torch.zeros(16)
    x[0] = 6 * scale
    x[1:8] = torch.tensor(BOUNDS) * scale
    x[8:15] = -torch.tensor(BOUNDS) * scale
    out = torch_backend.nvfp4_fake_quant(x, 16, global_amax)
    assert out[1:8].tolist() == [v * scale for v in TIES_EVEN]
    assert out[8:15].tolist() == [-v * scale for v in TIES_EVEN]


def test_signed_zero_policy_follows_each_reference():
    x = torch.tensor([0.0, -0.0, 1e-3, -1e-3] + [6.0] + [0.0] * 11)  # +-1e-3 round to zero
    mx = torch_backend.mxfp4_fake_quant(x, 16)
    nv = torch_backend.nvfp4_fake_quant(x, 16)
    assert torch.signbit(mx[:4]).tolist() == [True, True, False, True]  # MX: exact zeros -> -0.0
    assert torch.signbit(nv[:4]).tolist() == [False, False, False, False]  # NV: every zero is +0.0


@pytest.mark.parametrize("last_dim", [40, 7, 100])
def test_partial_last_block_is_zero_padded(last_dim):
    x = random_weights((3, last_dim), torch.bfloat16, seed=5)
    padded = torch.nn.functional.pad(x, (0, -last_dim % 32))
    assert_bit_equal(torch_backend.mxfp4_fake_quant(x, 32), ref_mx(padded, 32)[:, :last_dim])
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, 32), ref_nv(padded, 32)[:, :last_dim])


def test_nvfp4_all_zero_tensor_stays_zero_where_reference_gives_nan():
    x = torch.zeros(2, 32)
    assert torch.isnan(ref_nv(x, 16)).all()  # the reference divides by a zero global scale
    out = torch_backend.nvfp4_fake_quant(x, 16)
    assert torch.equal(bits(out), bits(torch.zeros_like(x)))


def test_chunking_does_not_change_results(monkeypatch):
    x = random_weights((2, 32, 96), torch.bfloat16, seed=7)
    whole_mx, whole_nv = torch_backend.mxfp4_fake_quant(x, 32), torch_backend.nvfp4_fake_quant(x, 16)
    whole_enc = torch_backend.mxfp4_encode(x, 32)
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 1000)  # 7-13 chunks; the last one is partial
    assert_bit_equal(torch_backend.mxfp4_fake_quant(x, 32), whole_mx)
    assert_bit_equal(torch_backend.nvfp4_fake_quant(x, 16), whole_nv)
    for ours, whole in zip(torch_backend.mxfp4_encode(x, 32), whole_enc):
        assert torch.equal(ours, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_matches_reference_layout_and_decode_round_trips(dtype):
    crafted = crafted_cases(32)
    extra = torch.cat([crafted["ties"], crafted["zeros"][:1]])[None]  # 5 tie rows + 1 zero row
    x = torch.cat([random_weights((4, 6, 64), dtype, seed=9), extra.to(dtype)])
    blocks, scales = torch_backend.mxfp4_encode(x, 32)
    assert blocks.shape == (5, 6, 2, 16) and scales.shape == (5, 6, 2)  # OpenAI's *_blocks / *_scales
    assert blocks.dtype == scales.dtype == torch.uint8
    ref_q, ref_scales = MXFP4QTensor.quantize(x.clone(), 32)
    assert torch.equal(blocks.reshape(ref_q._quantized_data.shape), ref_q._quantized_data)
    assert torch.equal(scales.reshape(-1), ref_scales.reshape(-1))
    assert_bit_equal(torch_backend.mxfp4_decode(blocks, scales, dtype), torch_backend.mxfp4_fake_quant(x, 32))


def test_encode_rejects_partial_blocks():
    with pytest.raises(ValueError, match="block"):
        torch_backend.mxfp4_encode(torch.ones(4, 40), 32)


def make_quantizer(**cfg) -> TensorQuantizer:
    torch_backend.register()
    return TensorQuantizer(QuantizerAttributeConfig(backend=torch_backend.BACKEND_NAME, **cfg))


MX_BLOCKS = {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}
NV_BLOCKS = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}


def test_backend_output_and_straight_through_gradient():
    x = random_weights((8, 64), torch.float32, seed=11).requires_grad_()
    upstream = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for blocks, expected in [
        (MX_BLOCKS, torch_backend.mxfp4_fake_quant(x, 32)),
        (NV_BLOCKS, torch_backend.nvfp4_fake_quant(x, 16)),  # no calibrated _amax: falls back to max |x|
    ]:
        x.grad = None
        out = make_quantizer(num_bits=(2, 1), block_sizes=blocks)(x)
        assert_bit_equal(out.detach(), expected)
        out.backward(upstream)
        assert torch.equal(x.grad, upstream)


def test_backend_uses_calibrated_amax_and_clipped_ste_when_asked():
    x = (torch.linspace(-2, 2, 64)[None].repeat(4, 1)).requires_grad_()
    quantizer = make_quantizer(num_bits=(2, 1), block_sizes=NV_BLOCKS, pass_through_bwd=False)
    quantizer.amax = torch.tensor(1.0)
    out = quantizer(x)
    assert_bit_equal(out.detach(), ref_nv(x.detach(), 16, torch.tensor(1.0)))
    out.sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 1.0).float())


@pytest.mark.parametrize(
    "cfg",
    [
        {"num_bits": 8, "axis": None},
        {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}},
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (5, 2)}},
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3), "four_over_six": True}},
    ],
)
def test_unsupported_configs_raise(cfg):
    quantizer = make_quantizer(**cfg)
    with pytest.raises(NotImplementedError, match=torch_backend.BACKEND_NAME):
        quantizer(torch.ones(4, 32))


def test_register_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # modelopt warns "Overwriting existing backend"
        torch_backend.register()
        torch_backend.register()


def tiny_gpt_oss() -> GptOssForCausalLM:
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )
    return GptOssForCausalLM(config).float()


def with_backend(config: dict) -> dict:
    config = copy.deepcopy(config)
    for entry in config["quant_cfg"]:
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(cfg, dict) and cfg.get("enable", True):
                cfg["backend"] = torch_backend.BACKEND_NAME
    return config


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_through_modelopt_uses_our_fake_quant_with_straight_through_grads(fmt):
    torch_backend.register()
    base = {"mxfp4": mtq.MXFP4_MLP_WEIGHT_ONLY_CFG, "nvfp4": mtq.NVFP4_MLP_WEIGHT_ONLY_CFG}[fmt]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    calibrate = lambda m: [m(input_ids=ids) for _ in range(2)]  # noqa: E731
    model = mtq.quantize(tiny_gpt_oss(), with_backend(base), calibrate)
    # The twin keeps the same modelopt wrappers (so every kernel and summation order is the same) but
    # no quantization: it runs on the fake-quantized numbers as plain weights.
    twin = copy.deepcopy(model)
    mtq.disable_quantizer(twin, "*")

    for layer, twin_layer in zip(model.model.layers, twin.model.layers):
        experts, twin_experts = layer.mlp.experts, twin_layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            quantizer = getattr(experts, f"{name}_weight_quantizer")
            assert quantizer.backend == torch_backend.BACKEND_NAME and quantizer.is_enabled
            raw = getattr(experts, name).detach().transpose(-1, -2)  # modelopt quantizes (E, out, in)
            if fmt == "mxfp4":
                expected = torch_backend.mxfp4_fake_quant(raw, 32)
            else:
                assert quantizer._amax.numel() == 1  # calibrated per-tensor global amax
                expected = torch_backend.nvfp4_fake_quant(raw, 32, quantizer._amax)
            with experts.quantize_weight():
                used = getattr(experts, name).detach()
            assert_bit_equal(used, expected.transpose(-1, -2))
            assert not torch.equal(used, raw.transpose(-1, -2))
            getattr(twin_experts, name).data.copy_(used)

    loss = model(input_ids=ids, labels=ids).loss
    twin_loss = twin(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, twin_loss, rtol=0, atol=0)
    loss.backward()
    twin_loss.backward()
    # Straight-through: every grad, the experts' raw weights included, equals the twin's grad.
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, twin_params[name].grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "nvfp4_w4a4"])
def test_weights_quantized_once_computes_the_same_numbers_and_restores_the_masters(fmt):
    """Evaluation fixes the fake-quantized expert weights for its ~100 forwards per batch instead of re-quantizing
    them at each: same logits bit for bit, input quantizers (W4A4) still on, masters back bit-exact afterwards."""
    from engine.fp4 import modelopt_glue

    torch_backend.register()
    base = {"mxfp4": mtq.MXFP4_MLP_WEIGHT_ONLY_CFG, "nvfp4": mtq.NVFP4_MLP_WEIGHT_ONLY_CFG,
            "nvfp4_w4a4": mtq.NVFP4_MLP_ONLY_CFG}[fmt]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    model = mtq.quantize(tiny_gpt_oss(), with_backend(base), lambda m: [m(input_ids=ids) for _ in range(2)])
    masters = {item.name: item.weight.detach().clone() for item in modelopt_glue.expert_weights(model)}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with modelopt_glue.weights_quantized_once(model) as fixed:
            assert fixed == 4  # 2 layers x (gate_up_proj, down_proj)
            assert not any(item.quantizer.is_enabled for item in modelopt_glue.expert_weights(model))
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    for item in modelopt_glue.expert_weights(model):
        assert item.quantizer.is_enabled
        assert torch.equal(item.weight, masters[item.name]), item.name


def test_weights_quantized_once_leaves_a_model_with_live_adapters_alone():
    """An adapter on an expert weight is added before quantization: fixing the quantized weights would drop it."""
    from peft import LoraConfig, get_peft_model

    from engine.fp4 import modelopt_glue

    torch_backend.register()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    model = mtq.quantize(tiny_gpt_oss(), with_backend(mtq.MXFP4_MLP_WEIGHT_ONLY_CFG), lambda m: m(input_ids=ids))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with modelopt_glue.weights_quantized_once(model) as fixed:
        assert fixed == 0
        assert all(item.quantizer.is_enabled for item in modelopt_glue.expert_weights(model))
