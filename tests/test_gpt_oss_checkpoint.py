"""bench/make_gpt_oss_checkpoint.py: gpt-oss-20b's config and layout; a scaled-down checkpoint loads in transformers.

The generator runs as a real process (as the lead runs it on the GPU machine); the checkpoint is then loaded the way
the engine loads openai/gpt-oss-20b (`Mxfp4Config(dequantize=True)`), every key accounted for.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.fp4 import model_io, torch_backend

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "make_gpt_oss_checkpoint.py"
SMALL = ["--layers", "2", "--experts", "4", "--hidden-size", "128", "--vocab-size", "4096"]


def generator():
    spec = importlib.util.spec_from_file_location("make_gpt_oss_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_small(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(SCRIPT), str(out), *SMALL, *extra], check=True, cwd=REPO,
                   capture_output=True, text=True)
    return out


def test_config_is_gpt_oss_20b():
    """The default shape is openai/gpt-oss-20b's (NOTES.md: its config.json), and the plan sizes it at ~13 GB."""
    gen = generator()
    config = gen.gpt_oss_20b_config()
    expected = {"num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
                "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
                "head_dim": 64, "vocab_size": 201_088, "sliding_window": 128, "max_position_embeddings": 131_072,
                "rope_theta": 150_000, "swiglu_limit": 7.0, "tie_word_embeddings": False, "model_type": "gpt_oss"}
    assert {k: config[k] for k in expected} == expected
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 12
    assert config["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                      "truncate": False}
    assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    plan = gen.tensor_plan(config)
    size = sum(gen.nbytes(shape, dtype) for _, shape, dtype in plan)
    assert 13.0e9 < size < 14.5e9  # "~13 GB on disk in MXFP4"
    blocks = dict((n, s) for n, s, _ in plan)["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks == (32, 5760, 90, 16)


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--layers" in out.stdout and "--device" in out.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_small(tmp_path_factory.mktemp("gen") / "ck", "--max-shard-size-gb", "0.002")


def test_small_checkpoint_loads_in_transformers(small):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

    out = small
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert model_io.check_gpt_oss_checkpoint(out)["quantized"]

    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = model.config
    assert (config.num_hidden_layers, config.num_local_experts, config.hidden_size) == (2, 4, 128)
    assert config.num_attention_heads == 64 and config.num_key_value_heads == 8 and config.head_dim == 64

    # The dequantized expert weights are exactly the blocks/scales in the file, in transformers' (E, in, out).
    name = "model.layers.1.mlp.experts.down_proj"
    with safe_open(str(out / index["weight_map"][f"{name}_blocks"]), framework="pt") as f:
        blocks = f.get_tensor(f"{name}_blocks")
    with safe_open(str(out / index["weight_map"][f"{name}_scales"]), framework="pt") as f:
        scales = f.get_tensor(f"{name}_scales")
    decoded = torch_backend.mxfp4_decode(blocks, scales, torch.float32).reshape(4, 128, 128).transpose(-1, -2)
    loaded = model.state_dict()[name].float()
    assert torch.equal(loaded, decoded)
    assert loaded.abs().max() > 0

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert int(ids["input_ids"].max()) < config.vocab_size
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 4096 and torch.isfinite(logits).all()


def test_seeded_and_replaces(small, tmp_path):
    """Same seed, same bytes; a second run replaces the directory instead of mixing two checkpoints."""
    again = make_small(tmp_path / "again", "--max-shard-size-gb", "0.002")
    shards = sorted(p.name for p in small.glob("*.safetensors"))
    assert shards == sorted(p.name for p in again.glob("*.safetensors"))
    assert all((small / s).read_bytes() == (again / s).read_bytes() for s in shards)
    make_small(again, "--seed", "1")  # one shard now (default size): the old ten must be gone
    assert sorted(p.name for p in again.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert not again.with_name("again.tmp").exists()


@pytest.mark.parametrize("bad, message", [(["--hidden-size", "100"], "multiple of 32"),
                                          (["--vocab-size", "100"], "at least the tokenizer")])
def test_bad_sizes_refused(tmp_path, bad, message):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x"), *bad], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "x").exists()
