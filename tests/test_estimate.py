"""The memory / time estimator against numbers computed by hand (and one measured on an H100)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.training.estimate import GIB, KNOWN, OVERHEAD_GIB, estimate, lora_parameters, parameter_counts

REPO = Path(__file__).resolve().parents[1]

# gpt-oss-20b by hand: H = I = 2880, 24 layers, 32 experts, 64 heads x 64, 8 KV heads, vocab 201088, untied.
EXPERTS_PER_LAYER_20B = 32 * (2880 * 5760 + 5760 + 2880 * 2880 + 2880)  # gate_up + down, with biases = 796,538,880
ATTENTION_PER_LAYER = (2880 * 4096 + 4096) + 2 * (2880 * 512 + 512) + (4096 * 2880 + 2880) + 64  # 26,550,144
P_20B = 24 * (ATTENTION_PER_LAYER + 2880 * 32 + 32 + EXPERTS_PER_LAYER_20B) + 2 * 2880 * 24 + 2880 + 2 * 201088 * 2880
P_120B = (36 * (ATTENTION_PER_LAYER + 2880 * 128 + 128 + 4 * EXPERTS_PER_LAYER_20B) + 2 * 2880 * 36 + 2880
          + 2 * 201088 * 2880)


def test_parameter_counts_match_the_published_sizes():
    assert P_20B == 20_914_757_184 and P_120B == 116_829_156_672  # OpenAI: "21B" and "117B" parameters
    assert parameter_counts(KNOWN["gpt-oss-20b"])["total"] == P_20B
    assert parameter_counts(KNOWN["gpt-oss-120b"])["total"] == P_120B


def test_states_by_strategy_by_hand():
    full = estimate("openai/gpt-oss-20b", "full", 1, "single", gpu_memory_gib=80)["per_gpu_gib"]
    assert full["weights"] == round(2 * P_20B / GIB, 2) == 38.96  # bf16 weights
    assert full["grads"] == 38.96 and full["optimizer"] == round(4 * P_20B / GIB, 2)  # AdamW moments in bf16
    zero3 = estimate("openai/gpt-oss-20b", "full", 8, "deepspeed_zero3", gpu_memory_gib=80)["per_gpu_gib"]
    assert zero3["optimizer"] == round(12 * P_20B / 8 / GIB, 2)  # fp32 master + 2 moments, sharded 8 ways
    per_layer = ATTENTION_PER_LAYER + 2880 * 32 + 32 + EXPERTS_PER_LAYER_20B + 2 * 2880
    assert zero3["gathered_layers"] == round(2 * per_layer * 2 / GIB, 2)
    fsdp = estimate("openai/gpt-oss-20b", "full", 8, "fsdp2", gpu_memory_gib=80)["per_gpu_gib"]
    assert fsdp["weights"] == round(4 * P_20B / 8 / GIB, 2)  # fp32 sharded parameters


def test_lora_parameters_by_hand():
    per_layer = 8 * ((2880 + 4096) + 2 * (2880 + 512) + (4096 + 2880))  # q, k, v, o: r * (in + out)
    assert lora_parameters(KNOWN["gpt-oss-20b"], 8, False) == 24 * per_layer == 3_981_312
    experts = 8 * 32 * ((2880 + 5760) + (2880 + 2880))  # one A/B pair per expert and weight
    assert lora_parameters(KNOWN["gpt-oss-20b"], 8, True) == 24 * (per_layer + experts)
    lora = estimate("gpt-oss-20b", "lora", 1, "single", gpu_memory_gib=80)
    assert lora["trainable_parameters"] == 3_981_312
    assert lora["per_gpu_gib"]["optimizer"] == round(8 * 3_981_312 / GIB, 2)


def test_activations_by_hand():
    r = estimate("gpt-oss-20b", "full", 8, "deepspeed_zero3", batch=1, seq=4096, gpu_memory_gib=80)
    t = 4096
    layer = t * (18 * 2880 + 4 * 4 * 2880) * 2
    attention = 64 * 4096 * 4096 * 6
    kept = 24 * t * 2880 * 2 + layer + attention  # gradient checkpointing: layer inputs + one layer recomputed
    assert r["per_gpu_gib"]["activations"] == round((kept + t * 201088 * 6) / GIB, 2)


def test_calibrated_on_the_h100_benchmark():
    """docs/benchmarks.md: 2-layer 20b-shaped model, batch 4 x 1024, no checkpointing, AdamW: 28.3 GiB peak,
    0.104-0.105 s per step (39k tokens/s)."""
    two_layers = dict(KNOWN["gpt-oss-20b"], num_hidden_layers=2)
    r = estimate(two_layers, batch=4, seq=1024, gradient_checkpointing=False, gpu_memory_gib=80)
    without_overhead = r["per_gpu_gib"]["total"] - OVERHEAD_GIB
    assert abs(without_overhead - 28.3) / 28.3 < 0.10
    assert 0.09 < r["time"]["step_s"] < 0.12


def test_verdicts_and_suggestions():
    full = estimate("gpt-oss-20b", "full", 1, "single", gpu_memory_gib=80)
    assert full["verdict"] == "does not fit"
    assert full["suggestions"][0].startswith("use LoRA")
    assert "use 8 GPUs with ZeRO-3" in full["suggestions"][1]  # NVIDIA: 20b full SFT needs 8 x 80 GB
    assert estimate("gpt-oss-20b", "full", 8, "deepspeed_zero3", gpu_memory_gib=80)["verdict"] == "fits"
    big = estimate("gpt-oss-120b", "full", 8, "deepspeed_zero3", gpu_memory_gib=80)
    assert big["verdict"] == "does not fit" and any("64 GPUs with ZeRO-3" in s for s in big["suggestions"])
    small_card = estimate("gpt-oss-20b", "lora", 1, "single", gpu_memory_gib=24)
    assert small_card["verdict"] == "does not fit" and small_card["available_source"] == "given"


def test_config_sources_and_bad_arguments(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KNOWN["gpt-oss-20b"]))
    assert estimate(tmp_path, gpu_memory_gib=80)["parameters"] == P_20B
    assert estimate(tmp_path / "config.json", gpu_memory_gib=80)["parameters"] == P_20B
    with pytest.raises(ValueError, match="strategy 'single' runs on one GPU"):
        estimate("gpt-oss-20b", gpus=2)
    with pytest.raises(ValueError, match="method"):
        estimate("gpt-oss-20b", method="qlora")
    with pytest.raises(FileNotFoundError):
        estimate(tmp_path / "missing")


def test_flex_attention_and_chunked_loss_drop_the_scores_and_the_logits():
    """At 64k tokens eager's [batch, 64, T, T] scores (48 GiB per layer) and the [tokens, 201088] logits (72 GiB)
    dominate; flex keeps 8 bytes per query and head, the chunked loss one tile plus the lm_head's fp32 gradient."""
    from engine.training.estimate import activation_bytes, load_config

    c = load_config("gpt-oss-20b")
    eager = activation_bytes(c, 1, 65536, True)
    new = activation_bytes(c, 1, 65536, True, "flex", chunked_loss=True, lm_head_trains=False)
    assert eager["logits"] == 65536 * 201088 * 6
    assert new["logits"] == 4096 * 32768 * 2 + 65536 * 2880 * 6
    assert eager["layers"] - new["layers"] == 64 * 65536 * 65536 * 6 - 65536 * 64 * (2 * 64 + 8)
    lora_long = estimate("gpt-oss-20b", "lora", 1, "single", seq=65536, gpu_memory_gib=141, attention="flex",
                         chunked_loss=True)
    assert lora_long["verdict"] == "fits"
    assert estimate("gpt-oss-20b", "lora", 1, "single", seq=65536, gpu_memory_gib=141)["verdict"] == "does not fit"
    with pytest.raises(ValueError, match="attention"):
        estimate("gpt-oss-20b", attention="sdpa")


def test_flex_attention_time_counts_only_the_blocks_its_mask_keeps():
    """eager multiplies every query with every key in all 24 layers; flex skips masked 128 x 128 blocks: half of a
    causal layer (plus the diagonal blocks), the 128-key window (plus one block) of a sliding one."""
    from engine.training.estimate import attended_keys, load_config

    c = load_config("gpt-oss-20b")
    assert attended_keys(c, 65536, "eager") == 24 * 65536
    assert attended_keys(c, 65536, "flex") == 12 * (65536 / 2 + 64) + 12 * 256
    assert attended_keys(c, 64, "flex") == 24 * 64  # shorter than a block: every key, as eager
    eager = estimate("gpt-oss-20b", "lora", 1, "single", seq=65536, gpu_memory_gib=141)["time"]
    flex = estimate("gpt-oss-20b", "lora", 1, "single", seq=65536, gpu_memory_gib=141, attention="flex")["time"]
    attention_flops = 12 * 64 * 64  # per key and token: QK^T and PV, forward and backward, 64 heads of 64
    assert eager["flops_per_token"] - flex["flops_per_token"] == attention_flops * (24 * 65536 - (
        12 * (65536 / 2 + 64) + 12 * 256))
    assert flex["step_s"] < 0.5 * eager["step_s"]  # at 64k attention is most of eager's step


def test_recipe_estimate_follows_hardware_attention_and_chunked_loss():
    from engine.recipe.configs import Recipe
    from engine.training.estimate import estimate_recipe

    recipe = Recipe.model_validate({"model": {"source": "gpt-oss-20b"}, "data": {"max_length": 16384},
                                    "sft": {"lora": True}})
    on_gpu = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    assert (on_gpu["attention"], on_gpu["chunked_loss"]) == ("flex", True)  # auto on CUDA at >= 1024 tokens
    recipe.hardware.attention = "flex"
    flex = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    assert flex["attention"] == "flex"
    assert flex["per_gpu_gib"] == on_gpu["per_gpu_gib"]
    recipe.hardware.attention, recipe.hardware.chunked_loss = "eager", "off"
    eager = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    assert eager["per_gpu_gib"]["activations"] > flex["per_gpu_gib"]["activations"] + 50
    assert estimate_recipe(Recipe(), "sft", cuda=False)["attention"] == "eager"


def test_recipe_estimate_applies_the_trainers_auto_rule_at_the_threshold():
    """auto: eager below data.max_length 1024 (the demo's 256), flex from it, eager on CPU: what the trainer runs
    (both ask engine.training.attention.resolve)."""
    from engine.recipe.configs import Recipe
    from engine.training.estimate import estimate_recipe

    def attention_for(max_length: int, cuda: bool) -> str:
        recipe = Recipe.model_validate({"model": {"source": "gpt-oss-20b"}, "data": {"max_length": max_length},
                                        "sft": {"lora": True}})
        return estimate_recipe(recipe, "sft", cuda=cuda, gpu_memory_gib=141)["attention"]

    assert [attention_for(n, cuda=True) for n in (256, 1023, 1024, 4096)] == ["eager", "eager", "flex", "flex"]
    assert [attention_for(n, cuda=False) for n in (256, 4096)] == ["eager", "eager"]


def test_disk_estimate_of_the_20b_recipe():
    """The 1-GPU recipe keeps adapters, not model copies; its MXFP4 export is sized like the real layout (the
    checkpoint generator's tensor plan, an independent count of the same bytes)."""
    import importlib.util

    from engine.recipe.files import load_recipe
    from engine.training.estimate import GIB, estimate_recipe

    recipe = load_recipe(REPO / "assets" / "recipes" / "gpt-oss-20b-1gpu.yaml", {"model.source": "openai/gpt-oss-20b"})
    disk = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)["disk_gib"]
    spec = importlib.util.spec_from_file_location("gen", REPO / "bench" / "make_gpt_oss_checkpoint.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    plan_bytes = sum(gen.nbytes(s, d) for _, s, d in gen.tensor_plan(gen.gpt_oss_20b_config()))
    assert abs(disk["export mxfp4"] - plan_bytes / GIB) < 0.02, (disk, plan_bytes / GIB)
    assert disk["sft"] < 1 and disk["qat"] < 2 and disk["total"] < 30  # megabytes of adapters + two exports
    full = load_recipe(REPO / "assets" / "recipes" / "gpt-oss-20b-1gpu.yaml",
                       {"model.source": "openai/gpt-oss-20b", "sft.lora": False, "qat.lora": False})
    full_disk = estimate_recipe(full, "sft", cuda=True, gpu_memory_gib=141)["disk_gib"]
    assert full_disk["sft"] > 3 * 39  # a whole bf16 model (39 GiB) plus two checkpoints of weights and moments
