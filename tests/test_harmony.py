"""Harmony rendering, the chat template's generation mask, and completion parsing, on the real tokenizer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained  # noqa: E402

from engine.data import harmony, embedded_model  # noqa: E402
from engine.data.harmony import parse_completion  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "developer", "content": "reasoning language: French"},
    {"role": "user", "content": "What is 7 plus 5?"},
    {"role": "assistant", "content": "12", "thinking": "Je dois additionner 7 et 5. 7 plus 5 font 12."},
]
EXPECTED = (
    "<|start|>system<|message|>You are a helpful assistant.<|end|>"
    "<|start|>developer<|message|>reasoning language: French<|end|>"
    "<|start|>user<|message|>What is 7 plus 5?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Je dois additionner 7 et 5. 7 plus 5 font 12.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>12<|return|>"
)
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "thinking": "Easy."},
]
EXPECTED_MULTI = (
    "<|start|>user<|message|>Hi<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
    "<|start|>user<|message|>2+2?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Easy.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_model.load_tokenizer()


@pytest.mark.parametrize("messages, expected", [(CHAT, EXPECTED), (MULTI_TURN, EXPECTED_MULTI)])
def test_render_and_template_match_spec_byte_for_byte(tokenizer, messages, expected):
    assert harmony.render(messages) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_generation_prompt_appends_start_assistant(tokenizer):
    prompt, _ = harmony.split_prompt(CHAT)
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED.split("<|start|>assistant<|channel|>analysis")[0] + "<|start|>assistant"
    assert harmony.render(prompt, add_generation_prompt=True) == rendered


def test_null_thinking_on_prompt_messages_renders_like_missing(tokenizer):
    with_nulls = [dict(m, thinking=m.get("thinking")) for m in CHAT]  # what parquet / hub rows look like
    assert tokenizer.apply_chat_template(with_nulls, tokenize=False) == EXPECTED


def _masked(tokenizer, messages) -> tuple[str, str]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    inside = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    outside = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    return inside, outside


def test_generation_mask_covers_exactly_the_assistant_output(tokenizer):
    inside, outside = _masked(tokenizer, CHAT)
    assert inside == ("<|channel|>analysis<|message|>Je dois additionner 7 et 5. 7 plus 5 font 12.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>12<|return|>")
    assert outside == EXPECTED.split("<|channel|>analysis")[0]  # the whole prompt, up to <|start|>assistant


def test_generation_mask_covers_every_assistant_turn(tokenizer):
    inside, outside = _masked(tokenizer, MULTI_TURN)
    assert inside == ("<|channel|>final<|message|>Hello!<|end|>"
                      "<|channel|>analysis<|message|>Easy.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert outside == ("<|start|>user<|message|>Hi<|end|><|start|>assistant"
                       "<|start|>user<|message|>2+2?<|end|><|start|>assistant")


def test_trl_accepts_the_template_for_assistant_only_loss(tokenizer):
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)  # the <|end|>/<|return|> is inside the loss mask


def test_eos_tokens_are_single_special_ids(tokenizer):
    assert set(harmony.EOS_TOKENS) == {"<|return|>", "<|call|>", "<|endoftext|>"}
    for token in harmony.SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [embedded_model.special_id(token)]


COMPLETION = "<|channel|>analysis<|message|>I need to add 7 and 5. The final sum is 12.<|end|>" \
             "<|start|>assistant<|channel|>final<|message|>12<|return|>"


def test_parse_complete_completion_with_padding():
    parsed = parse_completion(COMPLETION + "<|endoftext|><|endoftext|>")
    assert parsed["analysis"] == "I need to add 7 and 5. The final sum is 12."
    assert parsed["final"] == "12"
    assert parsed["raw"].startswith("<|channel|>analysis")


def test_parse_completion_without_special_tokens(tokenizer):
    ids = tokenizer.encode(COMPLETION, add_special_tokens=False)
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert plain == "analysisI need to add 7 and 5. The final sum is 12.assistantfinal12"
    parsed = parse_completion(plain)  # "final" inside the analysis must not split it
    assert (parsed["analysis"], parsed["final"]) == ("I need to add 7 and 5. The final sum is 12.", "12")


@pytest.mark.parametrize("text, analysis, final", [
    ("<|channel|>analysis<|message|>I need to add 7 a", "I need to add 7 a", ""),
    ("<|channel|>analysis<|message|>Sum.<|end|><|start|>assistant<|channel|>final<|message|>1", "Sum.", "1"),
    ("<|channel|>analysis<|message|>Sum.<|end|><|start|>assistant", "Sum.", ""),
    ("analysisI need to add", "I need to add", ""),
    ("<|start|>assistant<|channel|>final<|message|>12<|return|>", "", "12"),
    ("<|channel|>final<|message|>12<|end|>", "", "12"),
    ("finalOnly an answer", "", "Only an answer"),
    ("Just text, no structure.", "", "Just text, no structure."),
    ("", "", ""),
])
def test_parse_truncated_and_odd_completions(text, analysis, final):
    parsed = parse_completion(text)
    assert (parsed["analysis"], parsed["final"], parsed["raw"]) == (analysis, final, text)


def test_parse_stops_at_call_and_ignores_constrain():
    text = ("<|channel|>commentary to=functions.add <|constrain|>json<|message|>{\"a\": 1}<|call|>"
            "<|channel|>final<|message|>not reached")
    parsed = parse_completion(text)
    assert parsed["final"] == "" and parsed["analysis"] == ""
