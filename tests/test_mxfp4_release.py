"""The embedded base released like gpt-oss: an OpenAI-layout MXFP4 checkpoint whose loaded experts sit on the grid."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.data import embedded_model  # noqa: E402
from engine.evaluation import evaluator  # noqa: E402
from engine.fp4 import model_io, mxfp4_release, torch_backend  # noqa: E402

STEPS = 12  # a short base (its release: 2 QAT steps); enough to exercise both phases


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_tiny.py: two threads on the shared 2 cores spin-wait on each other
    messages: list[str] = []
    cache = tmp_path_factory.mktemp("cache")
    path = mxfp4_release.ensure_mxfp4_base(cache, steps=STEPS, log=messages.append)
    yield cache, path, messages
    torch.set_num_threads(previous)


def on_grid(weight: torch.Tensor) -> bool:
    """MXFP4 quantize-dequantize (blocks of 32 along the input dim, as the export and QAT) leaves it unchanged."""
    view = weight.detach().float().transpose(-1, -2).contiguous()
    return torch.equal(torch_backend.mxfp4_fake_quant(view, 32, use_triton=False), view)


def expert_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}


def test_release_is_an_openai_mxfp4_checkpoint(released):
    _, path, messages = released
    assert model_io.is_mxfp4_checkpoint(path)
    summary = model_io.check_gpt_oss_checkpoint(path)
    assert summary["quantized"]
    info = json.loads((path / "release.json").read_text())
    assert info["steps"] == mxfp4_release.release_steps(STEPS) == 2
    assert any("MXFP4 release" in m for m in messages)


def test_loaded_experts_are_exactly_on_the_mxfp4_grid(released):
    cache, path, _ = released
    model = model_io.load_model(path, torch.float32, torch.device("cpu"))  # Mxfp4Config(dequantize=True)
    experts = expert_weights(model)
    assert len(experts) == 2 * model.config.num_hidden_layers
    for name, weight in experts.items():
        assert on_grid(weight), name
    # Not trivially so: the BF16 base it was released from is off the grid, and the release moved the weights.
    base_dir = next(cache.glob("tiny-gpt-oss-base-*"))
    base = evaluator.load_expert_weights(base_dir)
    assert not any(on_grid(w) for w in base.values())
    assert all(not torch.equal(base[n], experts[n].detach()) for n in experts)


def test_stored_experts_decode_to_the_loaded_weights(released):
    """The survival diagnostic reads the base's experts from disk: the decoded blocks equal what transformers loads."""
    _, path, _ = released
    model = model_io.load_model(path, torch.float32, torch.device("cpu"))
    stored = evaluator.load_expert_weights(path)
    experts = expert_weights(model)
    assert set(stored) == set(experts)
    for name, weight in experts.items():
        assert torch.equal(stored[name], weight.detach()), name


def test_second_call_returns_the_cache(released):
    cache, path, _ = released
    messages: list[str] = []
    assert mxfp4_release.ensure_mxfp4_base(cache, steps=STEPS, log=messages.append) == path
    assert not any("MXFP4 release" in m for m in messages) and any("cached" in m for m in messages)


def test_prepare_and_the_overhead_bench_ask_for_the_base_the_recipe_names(released):
    """bench/engine_overhead.py warms its cache with the prepare stage's own choice: it once warmed only the BF16
    base, so the engine's timed prepare job paid the MXFP4 release (~18 s on the H200) and the bare side did not."""
    from engine.recipe.configs import ModelConfig
    from engine.stages.prepare import ensure_embedded_base

    cache, path, _ = released
    mxfp4 = ModelConfig(tiny_pretrain_steps=STEPS, tiny_release="mxfp4")
    bf16 = ModelConfig(tiny_pretrain_steps=STEPS, tiny_release="bf16")
    messages: list[str] = []
    assert ensure_embedded_base(cache, mxfp4, "cpu", log=messages.append) == path
    assert ensure_embedded_base(cache, bf16, "cpu", log=messages.append) == \
        cache / f"tiny-gpt-oss-base-{embedded_model.cache_key(STEPS, 0)}"
    assert all("cached" in m for m in messages)  # both found built, nothing trained again


def test_release_key_tracks_the_base_and_the_recipe(monkeypatch, tmp_path):
    a = mxfp4_release.release_key(tmp_path / f"tiny-gpt-oss-base-{embedded_model.cache_key(STEPS, 0)}")
    b = mxfp4_release.release_key(tmp_path / f"tiny-gpt-oss-base-{embedded_model.cache_key(STEPS, 1)}")
    monkeypatch.setitem(mxfp4_release.RELEASE, "lr", 1e-4)
    c = mxfp4_release.release_key(tmp_path / f"tiny-gpt-oss-base-{embedded_model.cache_key(STEPS, 0)}")
    assert len({a, b, c}) == 3
