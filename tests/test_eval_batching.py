"""The evaluation's batch size ('auto' on CUDA: one batch for a tiny model) changes speed, never answers or loss."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GptOssForCausalLM  # noqa: E402

from engine.data import embedded_model  # noqa: E402
from engine.data.chat_data import load_chat_dataset  # noqa: E402
from engine.evaluation import evaluator  # noqa: E402
from engine.recipe.configs import EvalConfig  # noqa: E402
from engine.stages.evaluate import pick_examples  # noqa: E402

GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = embedded_model.embedded_tokenizer()
    model = GptOssForCausalLM(embedded_model.tiny_config(len(tokenizer))).float().eval()
    return model, tokenizer


def test_greedy_answers_do_not_depend_on_the_batch(tiny):
    """Both tasks' prompts (different lengths, so left padding differs by batch): the same text row for row at
    batch 7 (several batches), 40 (one batch) and 'auto' (64 on CPU)."""
    model, tokenizer = tiny
    rows = pick_examples(load_chat_dataset("embedded:demo"), 20)
    assert len({r["task"] for r in rows}) == 2
    answers = {bs: [r["completion"]["raw"] for r in evaluator.generate_and_judge(model, tokenizer, rows, 12, bs)]
               for bs in (7, 40, "auto")}
    assert answers[7] == answers[40] == answers["auto"]
    assert len(set(answers[7])) > 1  # real, different answers


def test_eval_loss_does_not_depend_on_the_batch(tiny):
    model, tokenizer = tiny
    rows = load_chat_dataset("embedded:demo")[:50]
    by_batch = [evaluator.eval_loss(model, tokenizer, rows, 256, batch_size=bs) for bs in (32, 50, "auto")]
    assert by_batch[0] == pytest.approx(by_batch[1], rel=1e-5)
    assert by_batch[2] == by_batch[0]  # 'auto' on CPU is the former 32, bit for bit


def test_eval_loss_syncs_with_the_host_once_per_batch_not_once_per_row(tiny):
    """Each `.item()` / `int(tensor)` is a `_local_scalar_dense`: a GPU->host sync. The old loop paid one per row
    (1,200 per demo evaluation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
            return func(*args, **(kwargs or {}))

    model, tokenizer = tiny
    rows = load_chat_dataset("embedded:demo")[:40]
    with CountSyncs() as seen:
        evaluator.eval_loss(model, tokenizer, rows, 256, batch_size=20)
    assert seen.syncs <= 2 + 1, f"{seen.syncs} host syncs for 2 batches of 20 rows"


def test_generation_stops_when_every_row_has_finished(tiny):
    """A model whose every next token is the end of message: one forward (the prompt), not max_new_tokens."""
    model, tokenizer = tiny
    rows = load_chat_dataset("embedded:demo")[:6]
    eos = tokenizer.convert_tokens_to_ids(embedded_model.EOS_TOKENS[0])
    calls = []

    def always_eos(module, args, output):
        calls.append(1)
        logits = torch.zeros_like(output)
        logits[..., eos] = 1.0
        return logits

    handle = model.get_output_embeddings().register_forward_hook(always_eos)
    try:
        evaluator.generate_and_judge(model, tokenizer, rows, 50, 6)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_auto_batch_is_the_old_default_on_cpu_and_memory_sized_on_cuda():
    config = embedded_model.tiny_config(2048)
    per_row = evaluator.row_bytes(config, 96 + 96)
    assert evaluator.pick_batch_size("cpu", 0, per_row, 1200, cpu_default=64) == 64
    # an H200 with the tiny model loaded: every one of the demo's 1,200 prompts in one batch
    assert evaluator.pick_batch_size("cuda", 139 * GIB, per_row, 1200, cpu_default=64) == 1200
    # little memory: what half of it holds, at least one row
    assert evaluator.pick_batch_size("cuda", 100 * per_row, per_row, 1200, cpu_default=64) == 50
    assert evaluator.pick_batch_size("cuda", 0, per_row, 1200, cpu_default=64) == 1


def test_free_memory_stops_at_the_gpu_memory_limit():
    """hardware.gpu_memory_limit_gib caps the allocator at a fraction of the card: the auto batch must be sized for
    what the cap leaves, not for what the card has free."""
    total, reserved, allocated = 140 * GIB, 10 * GIB, 8 * GIB
    assert evaluator.usable_free_bytes(130 * GIB, total, reserved, allocated) == 132 * GIB  # no cap: as before
    assert evaluator.usable_free_bytes(130 * GIB, total, reserved, allocated, 79 / 140) == 71 * GIB  # 79 - 10 + 2
    assert evaluator.usable_free_bytes(5 * GIB, total, reserved, allocated, 79 / 140) == 7 * GIB  # the card is fuller
    assert evaluator.usable_free_bytes(130 * GIB, total, 80 * GIB, 80 * GIB, 79 / 140) == 0  # at the cap already


def test_row_bytes_of_gpt_oss_20b_keep_its_evaluation_batch_modest():
    """gpt-oss-20b's shape at 2,048 tokens: ~2.5 GB a row (the eager attention scores dominate), so ~70 GiB free
    after loading it on an H200 gives ~14 rows, not hundreds."""
    from transformers import GptOssConfig

    big = GptOssConfig(num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                       vocab_size=201_088)
    per_row = evaluator.row_bytes(big, 2048)
    assert 2e9 < per_row < 3e9
    assert 8 <= evaluator.pick_batch_size("cuda", 70 * GIB, per_row, 1200, cpu_default=64) <= 20


def test_recipe_batch_size_takes_auto_or_a_positive_number():
    assert EvalConfig().batch_size == "auto"
    assert EvalConfig(batch_size="48").batch_size == 48
    for bad in (0, "big", 5000):
        with pytest.raises(ValueError):
            EvalConfig(batch_size=bad)


def test_the_eval_set_is_tokenized_once_for_every_model_evaluated_on_it(tiny):
    """A chained run evaluates each model on the same eval rows with the same tokenizer (loaded again from each
    stage's directory): the chat-template tokenization runs for the first evaluation only."""
    model, _ = tiny
    rows = load_chat_dataset("embedded:demo")[:30]
    calls = []

    def counted_tokenizer():
        tokenizer = copy.deepcopy(embedded_model.embedded_tokenizer())  # a new object (embedded_tokenizer() caches)
        original = tokenizer.apply_chat_template
        tokenizer.apply_chat_template = lambda *a, **k: calls.append(1) or original(*a, **k)
        return tokenizer

    first = evaluator.eval_loss(model, counted_tokenizer(), rows, 256)
    assert len(calls) == len(rows)
    again = evaluator.eval_loss(model, counted_tokenizer(), rows, 256)
    assert len(calls) == len(rows) and again == first
    evaluator.eval_loss(model, counted_tokenizer(), rows[:20], 256)  # other rows: tokenized
    assert len(calls) == len(rows) + 20
