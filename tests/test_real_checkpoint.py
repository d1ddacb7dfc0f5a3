"""A real gpt-oss checkpoint as the base model: OpenAI's MXFP4 layout, its own tokenizer and chat template.

No gpt-oss weights can be downloaded here, so the checkpoint is generated: the tiny gpt-oss with its tokenizer,
written by our exporter in exactly the layout of openai/gpt-oss-20b (experts as `_blocks` / `_scales`,
quantization_config quant_method mxfp4). The helpers below are shared with test_distributed.py and test_lora.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.fp4 import torch_backend, model_io
from engine.recipe.configs import Recipe
from engine.runtime.context import Context
from storage import Store

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ shared helpers


def make_mxfp4_checkpoint(out: Path, seed: int = 0):
    """The tiny gpt-oss (random init) + its harmony tokenizer, exported in OpenAI's MXFP4 layout. Returns the model."""
    from transformers import GptOssForCausalLM

    from engine.fp4.export_mxfp4 import export_mxfp4
    from engine.data.embedded_model import VOCAB_SIZE, generation_config, load_tokenizer, tiny_config

    torch.manual_seed(seed)
    model = GptOssForCausalLM(tiny_config(VOCAB_SIZE))
    model.generation_config = generation_config()
    export_mxfp4(model, load_tokenizer(), out)
    return model


def make_small_data(out: Path, train: int = 80, held_out: int = 16) -> tuple[Path, Path]:
    """A few demo conversations of both tasks as train / eval .jsonl files (tokenizing 10k rows would take minutes)."""
    rows = []
    for name in ("language", "refusal"):
        with open(REPO / "assets" / "datasets" / f"{name}.jsonl") as f:
            rows += [json.loads(next(f)) for _ in range((train + held_out) // 2)]
    random.Random(0).shuffle(rows)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (rows[:train], rows[train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def recipe_for(checkpoint: Path, train: Path, held_out: Path, **overrides) -> Recipe:
    """The smoke recipe on the generated checkpoint and the small data, CPU, MXFP4 only."""
    from engine.recipe.files import load_recipe

    base = {"model.source": str(checkpoint), "data.source": str(train), "data.eval_source": str(held_out),
            "ptq.formats": ["mxfp4"], "hardware.device": "cpu"}
    return load_recipe(REPO / "assets" / "recipes" / "smoke.yaml", {**base, **overrides})


def stage_context(store: Store, root: Path, recipe: Recipe, stage: str, fmt: str = "bf16",
                  run_id: str | None = None, target: str | None = None) -> Context:
    """A job of `stage` in a run under `root`, to call the stage function in this process (as the child would)."""
    if run_id is None:
        run_id = store.create_run(recipe.name, recipe.model_dump(mode="json"), run_dir=str(root))
    key = stage if fmt == "bf16" else f"{stage}:{fmt}"
    job_id = store.add_job(run_id, stage, fmt, target=target, config={"key": key})
    store.update_job(job_id, status="running")
    return Context(store=store, workdir=root.parent, run=store.get_run(run_id), job=store.get_job(job_id),
                   recipe=recipe, device=torch.device("cpu"))


@pytest.fixture
def one_thread():
    """Train in this process on one thread, as each rank of a 2-process run does (torchrun sets OMP_NUM_THREADS=1).
    On a shared 2-core machine two OpenMP threads that wait for each other made the steps ~20x slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    model = make_mxfp4_checkpoint(root / "gpt-oss-mxfp4")
    train, held_out = make_small_data(root)
    return {"checkpoint": root / "gpt-oss-mxfp4", "train": train, "eval": held_out, "model": model}


# ------------------------------------------------------------------------------------------------ tests


def test_generated_checkpoint_has_openais_layout(assets):
    ckpt = assets["checkpoint"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["quantization_config"]["quant_method"] == "mxfp4"
    tensors = load_file(str(ckpt / "model.safetensors"))
    blocks = tensors["model.layers.1.mlp.experts.down_proj_blocks"]
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (4, 128, 128 // 32, 16)  # (E, out, in/32, 16)
    assert "model.layers.1.mlp.experts.down_proj" not in tensors
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"].count("<|start|>") >= 2


def test_loads_upcast_with_its_tokenizer(assets):
    """Mxfp4Config(dequantize=True): float experts equal to MXFP4 of the source weights; the checkpoint's tokenizer."""
    model = model_io.load_model(assets["checkpoint"], torch.float32, torch.device("cpu"))
    source = assets["model"].model.layers[0].mlp.experts.gate_up_proj.detach()
    expected = torch_backend.mxfp4_fake_quant(source.transpose(-1, -2), 32).transpose(-1, -2)
    loaded = model.model.layers[0].mlp.experts.gate_up_proj
    assert loaded.dtype == torch.float32 and torch.equal(loaded, expected)
    tokenizer = model_io.load_tokenizer(assets["checkpoint"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|start|>user<|message|>hi<|end|><|start|>assistant"


def test_prepare_validates_and_sft_trains_from_it(assets, tmp_path, one_thread):
    from engine.stages import prepare, sft

    recipe = recipe_for(assets["checkpoint"], assets["train"], assets["eval"], **{"sft.max_steps": 4,
                                                                                  "sft.eval_steps": 4})
    with Store(tmp_path / "studio.db") as store:
        ctx = stage_context(store, tmp_path / "runs" / "r", recipe, "prepare")
        result = prepare.run(ctx)
        assert result["base_model"] == str(assets["checkpoint"].resolve()) and result["train_rows"] == 80
        pointer = json.loads((ctx.run_dir / "models" / "base.json").read_text())
        assert pointer["quantized"] is True
        ctx = stage_context(store, ctx.run_dir, recipe, "sft", run_id=ctx.run_id)
        metrics = sft.run(ctx)
        losses = [r["value"] for r in store.metrics(job_id=ctx.job_id, names=["loss"])]
        assert len(losses) == 4 and losses[-1] < losses[0]  # it learned from the upcast MXFP4 weights
        trained = model_io.load_model(ctx.model_dir("sft"), torch.float32, torch.device("cpu"))
        assert metrics["eval_loss"] > 0 and not model_io.is_mxfp4_checkpoint(ctx.model_dir("sft"))
        assert not torch.equal(trained.model.layers[0].mlp.experts.gate_up_proj,
                               assets["model"].model.layers[0].mlp.experts.gate_up_proj)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_prepare_names_what_is_wrong(assets, tmp_path):
    broken = _copy(assets["checkpoint"], tmp_path / "no-scales")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.gate_up_proj_scales"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.gate_up_proj_scales missing"):
        model_io.check_gpt_oss_checkpoint(broken)

    no_template = _copy(assets["checkpoint"], tmp_path / "no-template")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        model_io.check_gpt_oss_checkpoint(no_template)

    wrong_shape = _copy(assets["checkpoint"], tmp_path / "wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = 64
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_up_proj_blocks has shape \(4, 256, 4, 16\), the config implies"):
        model_io.check_gpt_oss_checkpoint(wrong_shape)
