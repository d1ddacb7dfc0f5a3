"""LoRA SFT then LoRA QAT from a gpt-oss MXFP4 checkpoint, adapters on attention and on the experts of one layer,
merged and exported; the export must hold exactly the weights the adapted QAT model computed with. The LoRA stages
and PTQ keep adapters / quantizers and a pointer, never a whole copy of the model (engine/training/stage_outputs.py)."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file
from test_real_checkpoint import (  # noqa: F401 - one_thread is a fixture
    make_mxfp4_checkpoint, make_small_data, one_thread, recipe_for, stage_context)
from transformers import Mxfp4Config

from engine.training import lora
from engine.fp4 import model_io, modelopt_glue
from engine.recipe.configs import TrainConfig
from engine.fp4.export_mxfp4 import load_export
from storage import Store

LORA = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_target_experts": True, "lora_expert_layers": [1]}
EXPERTS = [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in modelopt_glue.EXPERT_WEIGHTS]


def test_expert_targets_and_config():
    assert lora.expert_targets(TrainConfig(lora=True)) is None
    everywhere = TrainConfig(lora=True, lora_target_experts=True)
    assert lora.expert_targets(everywhere) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    some = TrainConfig(lora=True, lora_target_experts=True, lora_expert_layers=[7, 3])
    assert lora.expert_targets(some) == ["layers.3.mlp.experts.gate_up_proj", "layers.3.mlp.experts.down_proj",
                                         "layers.7.mlp.experts.gate_up_proj", "layers.7.mlp.experts.down_proj"]
    config = lora.lora_config(some)
    assert config.target_modules == "all-linear" and config.lora_dropout == 0.0  # ParamWrapper refuses dropout
    with pytest.raises(ValueError, match="unique"):
        TrainConfig(lora_expert_layers=[1, 1])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_mxfp4_checkpoint(root / "gpt-oss-mxfp4")
    train, held_out = make_small_data(root)
    return root / "gpt-oss-mxfp4", train, held_out


def test_lora_sft_then_lora_qat_exports_the_merged_fake_quant_weights(assets, tmp_path, one_thread, monkeypatch,
                                                                     capsys):
    from engine.stages import export, prepare, ptq, qat, sft

    checkpoint, train, held_out = assets
    overrides = {f"{stage}.{k}": v for stage in ("sft", "qat") for k, v in LORA.items()}
    recipe = recipe_for(checkpoint, train, held_out, **overrides, **{
        "sft.max_steps": 4, "sft.save_steps": 4, "sft.eval_steps": 4, "qat.learning_rate": 5e-3,
        "qat.max_steps": 3, "qat.save_steps": 3, "qat.eval_steps": 3})
    with Store(tmp_path / "studio.db") as store:
        ctx = stage_context(store, tmp_path / "runs" / "r", recipe, "prepare")
        prepare.run(ctx)
        run = dict(run_id=ctx.run_id)
        sft.run(stage_context(store, ctx.run_dir, recipe, "sft", **run))
        base = model_io.load_model(checkpoint, torch.float32, torch.device("cpu"))
        tuned, _ = _open(ctx, "sft")  # the base with the saved adapters merged
        changed = {n for n in EXPERTS if not torch.equal(base.get_parameter(n), tuned.get_parameter(n))}
        assert changed == {EXPERTS[2], EXPERTS[3]}  # merged adapters on layer 1's experts only
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(base.get_parameter(q_proj), tuned.get_parameter(q_proj))  # attention adapters merged
        assert not any("lora" in n for n, _ in tuned.named_parameters())
        assert_no_model_copy(ctx.model_dir("sft"), checkpoint)

        for fmt in ("nvfp4", "mxfp4"):
            ptq_ctx = stage_context(store, ctx.run_dir, recipe, "ptq", fmt, **run)
            ptq.run(ptq_ctx)
            assert_no_model_copy(ctx.model_dir(f"ptq:{fmt}"), checkpoint)
            assert_same_model(ptq_ctx.models.pop(f"ptq:{fmt}")[0], _open(ctx, f"ptq:{fmt}", consume=True)[0], fmt)
        qat_ctx = stage_context(store, ctx.run_dir, recipe, "qat", "mxfp4", **run)
        collects = []
        real_collect = gc.collect
        with monkeypatch.context() as patch:
            patch.setattr(gc, "collect", lambda *a, **k: collects.append(1) or real_collect(*a, **k))
            qat.run(qat_ctx)
        assert len(collects) < recipe.qat.max_steps  # no gc.collect() per step (engine/stages/qat.py says why)
        assert_no_model_copy(ctx.model_dir("qat:mxfp4"), checkpoint)
        # Resume from that adapters-only checkpoint (as after a kill at the end): the same adapters come back.
        saved = load_file(str(ctx.model_dir("qat:mxfp4") / "adapter" / "adapter_model.safetensors"))
        qat.run(stage_context(store, ctx.run_dir, recipe, "qat", "mxfp4", **run))
        again = load_file(str(ctx.model_dir("qat:mxfp4") / "adapter" / "adapter_model.safetensors"))
        assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
        for step in (ctx.run_dir / "checkpoints" / "qat-mxfp4").glob("checkpoint-*"):  # resumable, adapters only
            assert_no_model_copy(step, checkpoint)

        # What the adapted model computed with: the PTQ model + the last QAT checkpoint (adapters and all, as a
        # resume loads it), fake_quant(W + BA).
        adapted, _ = _open(ctx, "ptq:mxfp4", consume=True)  # changed below: not kept for later opens (as QAT does)
        lora.add_adapters(adapted, recipe.qat)
        state = load_file(str(ctx.run_dir / "checkpoints" / "qat-mxfp4" / "checkpoint-3" / "trainable.safetensors"))
        missing, unexpected = adapted.load_state_dict(state, strict=False)
        assert not unexpected and set(state) == {n for n, p in adapted.named_parameters() if p.requires_grad}
        trained_b = [p for n, p in adapted.named_parameters() if "experts" in n and "lora_B" in n]
        assert len(trained_b) == 2 and all(p.abs().sum() > 0 for p in trained_b)  # the expert adapters did train
        computed = lora.quantized_weights_with_adapters(adapted)
        assert set(computed) == set(EXPERTS[2:])

        merged, _ = _open(ctx, "qat:mxfp4")
        effective = modelopt_glue.effective_expert_weights(merged)
        for name, weight in computed.items():
            assert torch.equal(effective[name], weight), name  # merge + fake quant == what QAT trained with
        prompt = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(adapted(input_ids=prompt).logits, merged(input_ids=prompt).logits, atol=1e-5)

        for ancestor, key in (("prepare", "sft"), ("ptq:mxfp4", "qat:mxfp4")):
            assert_built_on_the_kept_model(store, ctx, recipe, ancestor, key, capsys)

        export.run(stage_context(store, ctx.run_dir, recipe, "export", "mxfp4", target="qat:mxfp4", **run))
        reloaded = load_export(ctx.run_dir / "exports" / "mxfp4", torch.bfloat16,
                               quantization_config=Mxfp4Config(dequantize=True))
        for name in EXPERTS:
            assert torch.equal(reloaded.get_parameter(name).float(), effective[name]), name


def assert_same_model(model, fresh, what: str) -> None:
    """The same state (weights, quantizer amax) and exactly the same logits."""
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys(), what
    assert all(torch.equal(state[k], fresh_state[k]) for k in fresh_state), what
    prompt = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=prompt).logits, fresh.eval()(input_ids=prompt).logits), what


def assert_built_on_the_kept_model(store, ctx, recipe, ancestor: str, key: str, capsys) -> None:
    """A chained job process (engine/stages/job.py) keeps the last model it loaded; opening a stage stored as
    adapters / quantizers over that model builds on it instead of reading the base again, and gives exactly the
    model a fresh load gives."""
    from engine.stages.common import open_model

    def job_context(models: dict):
        job = stage_context(store, ctx.run_dir, recipe, "evaluate", target=key, run_id=ctx.run_id)
        job.models = models
        return job

    chain: dict = {}
    open_model(job_context(chain), ancestor)
    assert list(chain) == [ancestor]
    capsys.readouterr()
    built, _ = open_model(job_context(chain), key)
    assert f"building {key} on {ancestor}'s model" in capsys.readouterr().out
    assert list(chain) == [key]  # the ancestor was changed in place: it is no longer offered as itself
    assert_same_model(built, open_model(job_context({}), key)[0], key)


def assert_no_model_copy(directory, checkpoint) -> None:
    """A LoRA / PTQ stage's output holds no model weights file and a small fraction of the model's bytes."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if p.name.startswith("model") and p.suffix == ".safetensors"]
    written = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".pth", ".bin", ".pt"))
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    assert written < 0.25 * model_bytes, (directory, written, model_bytes)


def _open(ctx, key: str, consume: bool = False):
    from engine.stages.common import open_model

    model, tokenizer = open_model(ctx, key, consume=consume)
    return model.eval(), tokenizer
