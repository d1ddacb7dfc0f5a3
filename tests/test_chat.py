"""engine.serving.chat without a model: channel splitting of every reply shape, streamed piece by piece, the messages and
request fields it sends, and what a dead endpoint gives (a real closed port, no mocks). The live-server side is in
tests/test_serving.py."""

from __future__ import annotations

import pytest

from engine.data import harmony
from engine.serving.chat import ChannelSplitter, ChatClient, _unsettled_tail, stream_compare
from engine.serving.server_process import free_port

THINKING = "I need to add 2 and 3. 2 plus 3 is 5. The analysis says final is 5."
ANSWER = "The answer is 5."
MARKED = (f"<|channel|>analysis<|message|>{THINKING}<|end|><|start|>assistant<|channel|>final<|message|>"
          f"{ANSWER}<|return|>")
FLATTENED = f"analysis{THINKING}assistantfinal{ANSWER}"  # transformers serve without a response template


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("text", [MARKED, FLATTENED])
@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_raw_replies_split_into_channels_as_they_stream(text: str, size: int) -> None:
    splitter = ChannelSplitter()
    streamed = {"analysis": "", "final": ""}
    for piece in pieces(text, size):
        for channel, delta in splitter.feed(None, piece):
            streamed[channel] += delta
            # Nothing of a marker ever reaches the reader, even mid-stream.
            assert "<|" not in streamed[channel] and "assistantfinal" not in streamed[channel]
    analysis, final, tail = splitter.finish()
    for channel, delta in tail:
        streamed[channel] += delta
    assert (analysis, final) == (THINKING, ANSWER)
    assert streamed == {"analysis": THINKING, "final": ANSWER}


def test_structured_replies_pass_through() -> None:
    splitter = ChannelSplitter()
    out = splitter.feed("I think", None) + splitter.feed(" hard.", None) + splitter.feed(None, "Done") + \
        splitter.feed(None, " now.")
    assert out == [("analysis", "I think"), ("analysis", " hard."), ("final", "Done"), ("final", " now.")]
    assert splitter.finish()[:2] == ("I think hard.", "Done now.")


def test_plain_answer_without_channels_is_final() -> None:
    splitter = ChannelSplitter()
    for piece in pieces("Hello there, friend.", 4):
        splitter.feed(None, piece)
    assert splitter.finish()[:2] == ("", "Hello there, friend.")


def test_unsettled_tail_holds_only_possible_markers() -> None:
    assert _unsettled_tail("text assist") == len("assist")
    assert _unsettled_tail("text <|cha") == len("<|cha")
    assert _unsettled_tail("text done.") == 0
    assert _unsettled_tail("analysis complete") == 0


def test_messages_follow_the_sft_layout() -> None:
    client = ChatClient("http://127.0.0.1:9/v1", model="m")
    built = client.build_messages([{"role": "user", "content": "Hi"}], developer="Be brief.",
                                  reasoning_language="French")
    assert built == [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "developer", "content": "reasoning language: French\nBe brief."},
                     {"role": "user", "content": "Hi"}]
    assert harmony.render(built, add_generation_prompt=True).endswith("<|start|>assistant")
    bare = client.build_messages([{"role": "user", "content": "Hi"}], system=None)
    assert bare == [{"role": "user", "content": "Hi"}]


def test_reasoning_effort_fields_per_backend() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    local = ChatClient("http://127.0.0.1:9/v1", model="m", backend="transformers")._chat_request(
        messages, "high", 0.0, 0.9, 32, None)
    assert local["reasoning_effort"] == "high" and local["top_p"] == 0.9 and local["max_tokens"] == 32
    assert local["extra_body"] == {"chat_template_kwargs": {"reasoning_effort": "high"}}
    remote = ChatClient("http://127.0.0.1:9/v1", model="m")._chat_request(messages, "low", None, None, 32, None)
    assert "extra_body" not in remote and "temperature" not in remote  # strict OpenAI APIs reject unknown fields
    with pytest.raises(ValueError):
        ChatClient("http://127.0.0.1:9/v1", model="m")._chat_request(messages, "extreme", None, None, 32, None)


def test_a_dead_endpoint_is_an_error_event_not_an_exception() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    events = list(ChatClient(url, model="m", timeout=5).stream_chat([{"role": "user", "content": "Hi"}]))
    assert [e.kind for e in events] == ["error"] and "Connection" in events[0].text
    merged = list(stream_compare([[{"role": "user", "content": "Hi"}]] * 2,
                                 [ChatClient(url, model="m", timeout=5), ChatClient(url, timeout=5)], timeout=30))
    assert sorted(index for index, _ in merged) == [0, 1] and all(e.kind == "error" for _, e in merged)
