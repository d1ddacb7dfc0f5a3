"""Exporters: real tiny gpt-oss models, real files, read back the way servers read them. No mocks."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config  # noqa: E402

from engine.fp4 import torch_backend, modelopt_glue  # noqa: E402
from engine.fp4.export_mxfp4 import export_mxfp4, load_export, non_expert_state, verify_mxfp4_export  # noqa: E402
from engine.fp4.export_nvfp4 import export_nvfp4, load_dequantized, verify_nvfp4_export  # noqa: E402

E, HIDDEN, INTER, LAYERS = 4, 128, 128, 2
EXPERT_SHAPES = {"gate_up_proj": (HIDDEN, 2 * INTER), "down_proj": (INTER, HIDDEN)}  # (in, out)
MXFP4_QCFG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def tiny_model() -> GptOssForCausalLM:
    """The tiny gpt-oss after two SGD steps, so no weight is at its init value."""
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=512, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=E, num_experts_per_tok=2, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], architectures=["GptOssForCausalLM"])
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        ids = torch.randint(0, 512, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def calibrate(model) -> None:
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1)))


def quantized(base, fmt: str):
    loop = None if fmt == "mxfp4" else calibrate
    return modelopt_glue.quantize(copy.deepcopy(base), fmt, loop, modelopt_glue.resolve_backend("torch", "cpu"))


PROMPT = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, like=None) -> torch.Tensor:
    """Logits on PROMPT; with `like`, first switch to its experts kernel (from_pretrained picks grouped_mm, a model
    built from a config the eager loop; the two differ by float32 rounding, ~2e-7 here)."""
    if like is not None:
        model.set_experts_implementation(like.config._experts_implementation)
    return model(input_ids=PROMPT).logits.float()


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    from engine.data.embedded_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def mx(base):
    return quantized(base, "mxfp4")


@pytest.fixture(scope="module")
def nv(base):
    return quantized(base, "nvfp4")


@pytest.fixture(scope="module")
def mx_export(mx, tokenizer, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mx") / "exports" / "mxfp4"
    return out, export_mxfp4(mx, tokenizer, out)


def expected_and_others(model) -> tuple[dict, dict]:
    expected = modelopt_glue.effective_expert_weights(model)
    return expected, non_expert_state(model, skip=expected)


def rewrite(path: Path, **tensors: torch.Tensor) -> None:
    """Replace some tensors of a safetensors file in place."""
    state = load_file(str(path))
    state.update({k: v.contiguous() for k, v in tensors.items()})
    save_file(state, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ MXFP4


def test_mxfp4_files_keys_dtypes_shapes_and_config(mx_export, tokenizer) -> None:
    out, manifest = mx_export
    assert manifest["files"] == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                 "tokenizer_config.json"]
    assert manifest["bytes"] == sum((out / f).stat().st_size for f in manifest["files"])
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.old"))
    state = load_file(str(out / "model.safetensors"))
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj, (in_dim, out_dim) in EXPERT_SHAPES.items():
            blocks, scales = state.pop(prefix + proj + "_blocks"), state.pop(prefix + proj + "_scales")
            assert blocks.dtype == scales.dtype == torch.uint8
            assert tuple(blocks.shape) == (E, out_dim, in_dim // 32, 16)  # OpenAI: (E, out, in/32, 16)
            assert tuple(scales.shape) == (E, out_dim, in_dim // 32)
            bias = state.pop(prefix + proj + "_bias")
            assert bias.dtype == torch.bfloat16 and tuple(bias.shape) == (E, out_dim)
    assert not any("_quantizer" in k or k.endswith(("gate_up_proj", "down_proj")) for k in state)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "model.layers.0.self_attn.sinks" in state and "lm_head.weight" in state
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == MXFP4_QCFG
    assert config["architectures"] == ["GptOssForCausalLM"] and config["dtype"] == "bfloat16"
    assert not (out / "modelopt_state.pth").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template


def test_mxfp4_reloads_through_transformers_exactly(mx, mx_export) -> None:
    out, _ = mx_export
    expected, others = expected_and_others(mx)
    report = verify_mxfp4_export(out, expected, others)
    assert report["max_abs_diff"] == 0.0 and report["tensors_checked"] == len(expected) + len(others)
    # Independent of transformers: our own decoder gives the same (E, in, out) weights back.
    state = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    decoded = torch_backend.mxfp4_decode(state[name + "_blocks"], state[name + "_scales"], torch.float32)
    assert torch.equal(decoded.transpose(-1, -2), expected[name])


def ulps(reference: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """One unit in the last place at the largest |logit|, for a float with `mantissa_bits` stored bits."""
    return 2.0 ** (torch.floor(torch.log2(reference.abs().max())) - mantissa_bits)


def test_mxfp4_logits_match_the_fake_quant_model(mx, tokenizer, tmp_path) -> None:
    """Same weights, so the only differences are float rounding: modelopt hands the experts a transposed
    (non-contiguous) fake-quant weight, which changes the GEMM's summation order (measured: 2 float32 ulps)."""
    reference = logits(mx)
    def load(name: str, dtype: torch.dtype):
        return load_export(tmp_path / name, dtype, quantization_config=Mxfp4Config(dequantize=True))

    export_mxfp4(mx, tokenizer, tmp_path / "fp32", dtype=torch.float32)
    assert (logits(load("fp32", torch.float32), like=mx) - reference).abs().max() <= 4 * ulps(reference, 23)
    # bf16 export loaded in float32 = the fake-quant model with its non-expert weights rounded to bf16
    # (the experts need no rounding: MXFP4 values are exact in bf16).
    export_mxfp4(mx, tokenizer, tmp_path / "bf16")
    rounded = copy.deepcopy(mx)
    for name, param in rounded.named_parameters():
        if not name.endswith(modelopt_glue.EXPERT_WEIGHTS):
            param.data = param.data.to(torch.bfloat16).float()
    rounded_logits = logits(rounded)
    assert (logits(load("bf16", torch.float32), like=mx) - rounded_logits).abs().max() <= 4 * ulps(reference, 23)
    # Served as it ships (bf16 weights, bf16 compute): within 2 bf16 ulps of the largest logit (measured: < 1).
    assert (logits(load("bf16", torch.bfloat16), like=mx) - reference).abs().max() <= 2 * ulps(reference, 7)


def test_mxfp4_plain_model_exports_the_same_weights(base, mx_export, tmp_path) -> None:
    """An unquantized model is quantized on export exactly as the MXFP4 quantizer would (input-dim blocks)."""
    out = tmp_path / "plain"
    export_mxfp4(base, None, out)
    expected = {n: torch_backend.mxfp4_fake_quant(w.transpose(-1, -2), 32).transpose(-1, -2)
                for n, w in modelopt_glue.effective_expert_weights(base).items()}
    assert verify_mxfp4_export(out, expected)["max_abs_diff"] == 0.0
    plain = load_file(str(out / "model.safetensors"))
    quantized_export = load_file(str(mx_export[0] / "model.safetensors"))
    assert plain.keys() == quantized_export.keys()
    assert all(torch.equal(plain[k], quantized_export[k]) for k in plain if k.endswith(("_blocks", "_scales")))


def test_mxfp4_export_replaces_atomically(mx, nv, tmp_path) -> None:
    out = tmp_path / "mxfp4"
    out.mkdir()
    (out / "stale.bin").write_text("from an older export")
    export_mxfp4(mx, None, out)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").exists()
    before = sorted(p.name for p in out.iterdir())
    # A failure while writing (this "tokenizer" cannot be saved) leaves the previous export untouched.
    with pytest.raises(AttributeError):
        export_mxfp4(mx, object(), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mxfp4"]  # no .tmp / .old left behind
    with pytest.raises(ValueError, match="not quantized to MXFP4"):
        export_mxfp4(nv, None, out)


def test_sharded_exports_load_and_verify(mx, nv, tmp_path) -> None:
    """Big models are written as several shards plus an index, as save_pretrained does."""
    export_mxfp4(mx, None, tmp_path / "mx", max_shard_size="200KB")
    export_nvfp4(nv, None, tmp_path / "nv", max_shard_size="200KB")
    for d, model, verify in ((tmp_path / "mx", mx, verify_mxfp4_export), (tmp_path / "nv", nv, verify_nvfp4_export)):
        shards = sorted(d.glob("model-*-of-*.safetensors"))
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
        assert verify(d, *expected_and_others(model))["max_abs_diff"] == 0.0


def test_modelopt_mxfp4_export_puts_blocks_along_the_output_dim(mx, tmp_path) -> None:
    """Finding (modelopt 0.47), why export_mxfp4 exists: its MXFP4 scales tile the output dim, not the input dim."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(copy.deepcopy(mx), dtype=torch.bfloat16, export_dir=str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(state[name].shape) == (E, HIDDEN, 2 * INTER // 2)  # (E, in, out/2)
    assert tuple(state[name + "_weight_scale"].shape) == (E, HIDDEN, 2 * INTER // 32)  # blocks along out
    assert name + "_blocks" not in state


def test_mxfp4_output_dim_blocks_fail_verification(mx, tmp_path) -> None:
    """Negative control: blocks along the output dim (modelopt 0.47's MXFP4 export bug) must not verify.

    down_proj is square here, so the wrong blocks have the right shape and load without complaint.
    """
    out = tmp_path / "wrong"
    export_mxfp4(mx, None, out)
    expected = modelopt_glue.effective_expert_weights(mx)
    name = "model.layers.0.mlp.experts.down_proj"
    blocks, scales = torch_backend.mxfp4_encode(expected[name].contiguous())  # (E, in, out): blocks along out
    rewrite(out / "model.safetensors", **{name + "_blocks": blocks, name + "_scales": scales})
    with pytest.raises(ValueError, match=name):
        verify_mxfp4_export(out, expected)


# ------------------------------------------------------------------------------------------------ NVFP4


def test_nvfp4_export_is_modelopts_format(base, tmp_path) -> None:
    """For a bf16 model (where modelopt's exporter is exact) our files equal modelopt's byte for byte."""
    from modelopt.torch.export import export_hf_checkpoint

    model = quantized(copy.deepcopy(base).to(torch.bfloat16), "nvfp4")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    manifest = export_nvfp4(model, None, ours)
    assert manifest["quant_algo"] == "W4A16_NVFP4" and manifest["format"] == "nvfp4"
    export_hf_checkpoint(copy.deepcopy(model), dtype=torch.bfloat16, export_dir=str(theirs))
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert a[name].dtype == torch.uint8 and tuple(a[name].shape) == (E, HIDDEN // 2, 2 * INTER)  # (E, in/2, out)
    assert a[name + "_weight_scale"].dtype == torch.float8_e4m3fn
    assert tuple(a[name + "_weight_scale"].shape) == (E, HIDDEN // 32, 2 * INTER)
    assert a[name + "_weight_scale_2"].dtype == torch.float32 and a[name + "_weight_scale_2"].dim() == 0
    for file in ("config.json", "hf_quant_config.json"):
        ours_cfg, theirs_cfg = (json.loads((d / file).read_text()) for d in (ours, theirs))
        assert ours_cfg == theirs_cfg, file
    assert ours_cfg["quantization"]["quant_algo"] == "W4A16_NVFP4"
    expected, others = expected_and_others(model)
    assert verify_nvfp4_export(ours, expected, others)["max_abs_diff"] == 0.0


def test_nvfp4_roundtrip_exact_and_logits(nv, tokenizer, tmp_path) -> None:
    expected, others = expected_and_others(nv)
    export_nvfp4(nv, tokenizer, tmp_path / "bf16")
    report = verify_nvfp4_export(tmp_path / "bf16", expected, others)
    assert report["max_abs_diff"] == 0.0 and report["tensors_checked"] == len(expected) + len(others)
    # float32 export: NVFP4 values need float32 (scale_2 is arbitrary); logits then agree to float32 rounding.
    export_nvfp4(nv, tokenizer, tmp_path / "fp32", dtype=torch.float32)
    verify_nvfp4_export(tmp_path / "fp32", expected, others)
    reference = logits(nv)
    assert (logits(load_dequantized(tmp_path / "fp32"), like=nv) - reference).abs().max() <= 4 * ulps(reference, 23)


def test_modelopt_nvfp4_export_of_float32_model_does_not_verify(nv, tmp_path) -> None:
    """Finding (modelopt 0.47): it packs weight.to(bf16) with scales from the float32 weight, so the exported
    experts differ from the trained fake-quant weights; our verification catches it."""
    from modelopt.torch.export import export_hf_checkpoint

    expected = modelopt_glue.effective_expert_weights(nv)
    export_hf_checkpoint(copy.deepcopy(nv), dtype=torch.bfloat16, export_dir=str(tmp_path))
    with pytest.raises(ValueError, match="differ from the trained ones"):
        verify_nvfp4_export(tmp_path, expected)


def test_nvfp4_output_dim_blocks_fail_verification(nv, tmp_path) -> None:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    export_nvfp4(nv, None, tmp_path)
    expected = modelopt_glue.effective_expert_weights(nv)
    name = "model.layers.1.mlp.experts.down_proj"
    state = load_file(str(tmp_path / "model.safetensors"))
    weight = dict(nv.named_parameters())[name].detach()  # (E, in, out), quantized along out: wrong
    packed, scales, _ = NVFP4QTensor.quantize(weight, 32, weights_scaling_factor_2=state[name + "_weight_scale_2"])
    rewrite(tmp_path / "model.safetensors", **{name: packed._quantized_data.transpose(-1, -2).contiguous(),
                                              name + "_weight_scale": scales.transpose(-1, -2).contiguous()})
    with pytest.raises(ValueError, match=name):
        verify_nvfp4_export(tmp_path, expected)


def test_nvfp4_w4a4_writes_input_scales(base, tmp_path) -> None:
    model = quantized(base, "nvfp4_w4a4")
    manifest = export_nvfp4(model, None, tmp_path)
    assert manifest["quant_algo"] == "NVFP4" and manifest["format"] == "nvfp4_w4a4"
    state = load_file(str(tmp_path / "model.safetensors"))
    experts = model.model.layers[0].mlp.experts
    scale = state["model.layers.0.mlp.experts.down_proj_input_scale"]
    assert scale.dim() == 0 and torch.equal(scale, experts.down_proj_input_quantizer.amax.float() / (6 * 448))
    expected = modelopt_glue.effective_expert_weights(model)
    assert verify_nvfp4_export(tmp_path, expected)["max_abs_diff"] == 0.0
    assert tuple(state["model.layers.0.mlp.experts.down_proj_weight_scale"].shape) == (E, INTER // 16, HIDDEN)


def test_nvfp4_needs_a_quantized_model(base, tmp_path) -> None:
    with pytest.raises(ValueError, match="no enabled weight quantizer"):
        export_nvfp4(base, None, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


# ------------------------------------------------------------------------------------------------ stage


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_export_stage_registers_a_verified_artifact(fmt, mx, nv, tokenizer, tmp_path) -> None:
    from engine.fp4 import model_io
    from engine.recipe.configs import Recipe
    from engine.runtime.context import Context
    from engine.stages import export as export_stage
    from storage import Store

    with Store(tmp_path / "studio.db") as store:
        run_dir = tmp_path / "runs" / "r1"
        run_id = store.create_run("t", {}, run_dir=str(run_dir))
        model_io.save_model_atomic({"mxfp4": mx, "nvfp4": nv}[fmt], tokenizer, run_dir / "models" / f"qat-{fmt}")
        job_id = store.add_job(run_id, "export", fmt, target=f"qat:{fmt}")
        ctx = Context(store=store, workdir=tmp_path, run=store.get_run(run_id), job=store.get_job(job_id),
                      recipe=Recipe(), device=torch.device("cpu"))
        result = export_stage.run(ctx)
        out = run_dir / "exports" / fmt
        assert result["path"] == str(out) and result["verified"] and result["max_abs_diff"] == 0.0
        assert 0 < result["size_mb"] < result["bf16_size_mb"]
        (artifact,) = store.artifacts(run_id, kind="export")
        assert artifact["path"] == str(out) and artifact["meta"]["format"] == fmt and artifact["meta"]["verified"]
        assert artifact["bytes"] == artifact["meta"]["bytes"] > 0
        assert store.get_job(job_id)["progress"] == 1.0
