"""The tiny gpt-oss: its config, and the cached, deterministic, crash-safe base pre-training (reduced steps)."""

import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssForCausalLM  # noqa: E402

from engine.data import harmony, embedded_model  # noqa: E402

STEPS = 20  # enough to exercise the loop; the quality check at the default steps is run by hand, not here


def test_tiny_config_mirrors_gpt_oss_in_miniature():
    config = embedded_model.tiny_config(embedded_model.VOCAB_SIZE)
    assert config.intermediate_size % 32 == 0 and config.hidden_size % 32 == 0  # FP4 blocks of 32
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 64
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.architectures == ["GptOssForCausalLM"] and not config.tie_word_embeddings
    assert config.eos_token_id == embedded_model.special_id("<|return|>")
    assert config.pad_token_id == embedded_model.special_id("<|endoftext|>")
    model = GptOssForCausalLM(config)
    assert embedded_model.count_parameters(model) == 1_021_328
    assert model.model.layers[0].self_attn.sinks.shape == (4,)  # attention sinks, as in the real model
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 128, 256)


def test_other_expert_shapes_get_their_own_cache_key():
    """bench/demo_study.py tries other shapes; the default's key must not move (cached bases stay valid)."""
    shape = {"num_local_experts": 16, "num_experts_per_tok": 2}
    config = embedded_model.tiny_config(embedded_model.VOCAB_SIZE, shape)
    assert (config.num_local_experts, config.num_experts_per_tok, config.intermediate_size) == (16, 2, 128)
    assert embedded_model.cache_key(STEPS, 0, shape=shape) != embedded_model.cache_key(STEPS, 0)
    assert embedded_model.cache_key(STEPS, 0, shape=dict(embedded_model.SHAPE)) == embedded_model.cache_key(STEPS, 0)
    with pytest.raises(ValueError, match="shape keys"):
        embedded_model.tiny_config(embedded_model.VOCAB_SIZE, {"hidden_size": 64})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine two torch threads spin-wait on each other and run several times
    slower; determinism is per thread count, and every run here uses the same."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    messages, steps = [], []
    path = embedded_model.ensure_tiny_base(tmp_path_factory.mktemp("cache"), steps=STEPS, log=messages.append, seed=0,
                                           on_step=lambda step, total: steps.append((step, total)))
    return path, messages, steps


def test_base_is_loadable_offline_with_tokenizer_and_template(base_dir):
    path, messages, steps = base_dir
    assert f"pretrain step {STEPS}/{STEPS} loss" in " ".join(messages)
    # progress for the prepare job (the SFT tab shows it while SFT waits): each logged step, up to the last
    assert steps[-1] == (STEPS, STEPS) and len(steps) >= 2 and steps == sorted(set(steps))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, GptOssForCausalLM)
    assert tokenizer.chat_template == harmony.CHAT_TEMPLATE
    assert set(model.generation_config.eos_token_id) == {embedded_model.special_id(t) for t in harmony.EOS_TOKENS}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_second_call_returns_the_cache_without_training(base_dir):
    path, *_ = base_dir
    messages = []
    started = time.perf_counter()
    again = embedded_model.ensure_tiny_base(path.parent, steps=STEPS, log=messages.append, seed=0)
    assert again == path and time.perf_counter() - started < 5
    assert not any("pretrain step" in m for m in messages)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp directory left behind


def test_pretraining_is_deterministic(base_dir, tmp_path):
    path, *_ = base_dir
    again = embedded_model.ensure_tiny_base(tmp_path, steps=STEPS, log=lambda _: None, seed=0)
    first = AutoModelForCausalLM.from_pretrained(path).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cache_key_tracks_steps_and_seed():
    keys = {embedded_model.cache_key(10, 0), embedded_model.cache_key(11, 0), embedded_model.cache_key(10, 1)}
    assert len(keys) == 3 and embedded_model.cache_key(10, 0) == embedded_model.cache_key(10, 0)


def test_interrupted_pretraining_leaves_no_cache(tmp_path):
    def crash(message: str) -> None:
        if "pretrain step" in message:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        embedded_model.ensure_tiny_base(tmp_path, steps=STEPS, log=crash, seed=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_gpu_pretraining_is_deterministic_and_cached_apart_from_the_cpu_base(tmp_path):
    tokenizer = embedded_model.load_tokenizer()
    first = embedded_model.pretrain(tokenizer, STEPS, seed=0, log=lambda _: None, device="cuda")
    second = embedded_model.pretrain(tokenizer, STEPS, seed=0, log=lambda _: None, device="cuda")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert embedded_model.cache_key(STEPS, 0, device="cuda") != embedded_model.cache_key(STEPS, 0)
    path = embedded_model.ensure_tiny_base(tmp_path, steps=STEPS, log=lambda _: None, device="cuda")
    assert path.name.endswith(embedded_model.cache_key(STEPS, 0, device="cuda"))
