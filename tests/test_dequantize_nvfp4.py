"""The dequantized copy `transformers serve` gets for an NVFP4 export (engine/fp4/dequantize_nvfp4.py), tested like
the exporters' round trips: our decoder against modelopt's reference, the copy against the fake-quant model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.fp4 import modelopt_glue, torch_backend
from engine.fp4.export_mxfp4 import load_export
from engine.fp4.export_nvfp4 import export_nvfp4, load_dequantized
from tests.test_export import expected_and_others, logits, quantized, tiny_model


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def nv(base):
    return quantized(base, "nvfp4")


@pytest.fixture(scope="module")
def tokenizer():
    from engine.data.embedded_model import load_tokenizer

    return load_tokenizer()


def test_nvfp4_decoder_matches_modelopts_reference(nv, tmp_path) -> None:
    """Our decoder (no modelopt import: the web app runs it) against NVFP4QTensor.dequantize, bit for bit."""
    from engine.fp4.dequantize_nvfp4 import decode_expert
    from engine.fp4.export_nvfp4 import dequantize_expert, read_tensors

    export_nvfp4(nv, None, tmp_path)
    tensors = read_tensors(tmp_path)
    for name in modelopt_glue.effective_expert_weights(nv):
        ours = decode_expert(tensors[name], tensors[name + "_weight_scale"], tensors[name + "_weight_scale_2"])
        assert ours.dtype == torch.float32 and torch.equal(ours, dequantize_expert(tensors, name)), name
    with pytest.raises(ValueError, match="do not fit together"):
        torch_backend.nvfp4_decode(tensors[name].float(), tensors[name + "_weight_scale"], torch.tensor(1.0))


def test_nvfp4_dequantized_copy_loads_as_the_fake_quant_model(nv, tokenizer, tmp_path) -> None:
    """The copy `transformers serve` gets for an NVFP4 export: a plain checkpoint transformers loads with no
    quantizer, whose experts are the QAT fake-quant weights exactly and whose other tensors are the export's."""
    from engine.fp4.dequantize_nvfp4 import STAMP, dequantized_copy, write_dequantized

    export = tmp_path / "exports" / "nvfp4"
    export_nvfp4(nv, tokenizer, export)
    copy_dir = dequantized_copy(export)
    assert copy_dir == tmp_path / "exports" / "nvfp4-dequantized"
    config = json.loads((copy_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = load_export(copy_dir, torch.float32)  # strict: no missing / unexpected / mismatched key
    expected, others = expected_and_others(nv)
    state = dict(model.named_parameters())
    for name, weight in expected.items():
        assert torch.equal(state[name].detach(), weight.float()), name
    stored = load_file(str(export / "model.safetensors"))
    for name in others:
        assert torch.equal(model.state_dict()[name], stored[name].float()), name
    reference = logits(load_dequantized(export, torch.float32), like=model)
    assert torch.equal(logits(model), reference)  # the same model as the exporter's own reader builds
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(copy_dir)).chat_template == tokenizer.chat_template
    # Written once: a second call reuses it; a new export (files changed) rewrites it.
    before = (copy_dir / STAMP).stat().st_mtime_ns
    assert dequantized_copy(export) == copy_dir and (copy_dir / STAMP).stat().st_mtime_ns == before
    export_nvfp4(nv, tokenizer, export, max_shard_size="200KB")  # now sharded
    dequantized_copy(export)
    stamp = json.loads((copy_dir / STAMP).read_text())
    assert (copy_dir / STAMP).stat().st_mtime_ns != before and "model.safetensors.index.json" in stamp["files"]
    assert not list(tmp_path.glob("exports/*.tmp"))
    # A big model's copy is sharded too, and loads the same.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    files = write_dequantized(export, sharded, max_shard_bytes=200_000)
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load_export(sharded, torch.float32), like=model), reference)


def test_nvfp4_w4a4_has_no_dequantized_copy(base, tmp_path) -> None:
    from engine.fp4.dequantize_nvfp4 import dequantized_copy

    export_nvfp4(quantized(base, "nvfp4_w4a4"), None, tmp_path / "w4a4")
    with pytest.raises(ValueError, match="W4A4 also quantizes the activations"):
        dequantized_copy(tmp_path / "w4a4")
    assert not (tmp_path / "w4a4-dequantized").exists()
