"""Talk to a served gpt-oss through the `openai` client, with the harmony channels kept apart and timed.

    client = ChatClient("http://127.0.0.1:8000/v1")              api_key=None for our local servers
    for event in client.stream_chat([{"role": "user", "content": "What is 2 plus 3?"}], reasoning_language="French"):
        event.kind in ("analysis", "final")  -> event.text is the new piece of that channel
        event.kind == "done"                 -> event.result: ChatResult(analysis, final, stats)
    compare(prompt, [client_a, client_b])  -> [ChatResult, ...]   the same prompt to several endpoints
    stream_compare(...)                    -> (index, event) as the endpoints stream, side by side

Servers deliver the two channels in one of three shapes; all are handled:
  1. `reasoning_content` / `reasoning` deltas + `content` (vLLM and SGLang for gpt-oss; transformers serve with the
     response template engine/serving/harmony_view.py adds),
  2. raw harmony in `content` (`<|channel|>analysis<|message|>...`): servers that keep special tokens,
  3. flattened `analysisTHINKINGassistantfinalANSWER`: transformers serve without a response template.
For 2 and 3 the text is re-parsed with engine.data.harmony.parse_completion as it grows; a tail that could still become
a marker ("...assist", "<|cha") is held back until the next piece decides it.

Timing is measured here, on the client: TTFT = request sent -> first non-empty channel text. Tokens are the
server's `usage.completion_tokens` when it reports usage (it counts every generated token, channel markers
included), else the number of non-empty streamed deltas (each server here sends one delta per token).
decode tokens/s = (tokens - 1) / (time of last delta - time of first delta); e2e tokens/s = tokens / total time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.data import harmony

DEFAULT_SYSTEM = "You are a helpful assistant."  # what the demo tasks train with (engine/data/demo_tasks.py)
EFFORTS = ("low", "medium", "high")
# Markers whose first characters may sit at the end of a partial reply (shape 2 or 3 above).
_MARKERS = ("assistantfinal", "analysis", "final", *harmony.SPECIAL_TOKENS)


@dataclass
class ChatStats:
    ttft_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    token_source: str = "stream deltas"  # or "server usage"
    decode_tokens_per_s: float | None = None
    e2e_tokens_per_s: float | None = None
    finish_reason: str | None = None

    def line(self) -> str:
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s:.2f} s"
        rate = "-" if self.decode_tokens_per_s is None else f"{self.decode_tokens_per_s:.1f} tok/s"
        return f"TTFT {ttft} · {rate} · {self.tokens} tokens ({self.token_source}) · {self.total_s:.2f} s total"


@dataclass
class ChatResult:
    analysis: str = ""
    final: str = ""
    stats: ChatStats = field(default_factory=ChatStats)
    error: str | None = None
    endpoint: str = ""


@dataclass
class ChatEvent:
    kind: str  # "analysis" | "final" | "done" | "error"
    text: str = ""
    result: ChatResult | None = None


class ChannelSplitter:
    """Turns server deltas into analysis/final pieces, whatever shape (1-3 in the module doc) they come in."""

    def __init__(self):
        self.structured = False  # the server separates reasoning itself (shape 1)
        self.raw = ""  # the content text so far, for shapes 2-3
        self.sent = {"analysis": "", "final": ""}

    def feed(self, reasoning: str | None, content: str | None) -> list[tuple[str, str]]:
        out = []
        if reasoning:
            self.structured = True
            out += self._emit("analysis", self.sent["analysis"] + reasoning)
        if content:
            if self.structured:
                out += self._emit("final", self.sent["final"] + content)
            else:
                self.raw += content
                out += self._reparse(self.raw[: len(self.raw) - _unsettled_tail(self.raw)])
        return out

    def finish(self) -> tuple[str, str, list[tuple[str, str]]]:
        pieces = [] if self.structured else self._reparse(self.raw)
        if self.structured:
            return self.sent["analysis"], self.sent["final"], pieces
        parsed = harmony.parse_completion(self.raw)
        return parsed["analysis"], parsed["final"], pieces

    def _reparse(self, text: str) -> list[tuple[str, str]]:
        parsed = harmony.parse_completion(text)
        return self._emit("analysis", parsed["analysis"]) + self._emit("final", parsed["final"])

    def _emit(self, channel: str, full: str) -> list[tuple[str, str]]:
        """Only growth is streamed: a re-parse that rewrites what was sent waits for the final result."""
        before = self.sent[channel]
        if len(full) <= len(before) or not full.startswith(before):
            return []
        self.sent[channel] = full
        return [(channel, full[len(before):])]


def _unsettled_tail(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (it may still become one)."""
    for size in range(min(len(text), max(map(len, _MARKERS)) - 1), 0, -1):
        tail = text[-size:]
        if any(marker.startswith(tail) and marker != tail for marker in _MARKERS):
            return size
    return 0


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, backend: str | None = None,
                 timeout: float = 600.0, name: str = ""):
        from openai import OpenAI

        # Local servers take no key; the client insists on one, and a dummy one is sent nowhere else.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)
        self.base_url = base_url
        self.backend = backend
        self.name = name or base_url
        self._model = model

    def __repr__(self) -> str:  # never the key
        return f"ChatClient({self.base_url!r}, model={self._model!r})"

    @property
    def model(self) -> str:
        """The model to name in requests: given, or the first one the server lists (ours serve exactly one)."""
        if self._model is None:
            models = self._client.models.list().data
            if not models:
                raise RuntimeError(f"{self.base_url} lists no models")
            self._model = models[0].id
        return self._model

    def models(self) -> list[str]:
        return [m.id for m in self._client.models.list().data]

    # -- chat ---------------------------------------------------------------------------------------------------
    def build_messages(self, messages: list[dict], developer: str | None = None, reasoning_language: str | None = None,
                       system: str | None = DEFAULT_SYSTEM) -> list[dict]:
        """system + developer message + the conversation, in the Multilingual-Thinking layout our SFT teaches:
        the developer message starts with 'reasoning language: X'."""
        lines = [f"reasoning language: {reasoning_language}"] if reasoning_language else []
        lines += [developer.strip()] if developer and developer.strip() else []
        head = [{"role": "system", "content": system}] if system else []
        head += [{"role": "developer", "content": "\n".join(lines)}] if lines else []
        return head + [{"role": m["role"], "content": m["content"]} for m in messages]

    def stream_chat(self, messages: list[dict], developer: str | None = None, reasoning_language: str | None = None,
                    reasoning_effort: str | None = None, temperature: float | None = 0.0, top_p: float | None = None,
                    max_tokens: int = 256, system: str | None = DEFAULT_SYSTEM, seed: int | None = None
                    ) -> Iterator[ChatEvent]:
        built = self.build_messages(messages, developer, reasoning_language, system)
        splitter = ChannelSplitter()
        timer = _Timer()
        try:
            request = self._chat_request(built, reasoning_effort, temperature, top_p, max_tokens, seed)
            timer.restart()  # the first request may have listed the models: not part of TTFT
            stream = self._client.chat.completions.create(**request)
            with stream:
                for chunk in stream:
                    for channel, text in self._pieces(chunk, splitter, timer):
                        yield ChatEvent(channel, text)
        except Exception as exc:  # the server's own message says more than a traceback would
            text = _error_text(exc)
            yield ChatEvent("error", text=text, result=ChatResult(error=text, endpoint=self.name))
            return
        analysis, final, tail = splitter.finish()
        for channel, text in tail:
            yield ChatEvent(channel, text)
        yield ChatEvent("done", result=ChatResult(analysis, final, timer.stats(), endpoint=self.name))

    def chat(self, messages: list[dict], **kwargs) -> ChatResult:
        """stream_chat, collected."""
        result = None
        for event in self.stream_chat(messages, **kwargs):
            if event.kind in ("done", "error"):
                result = event.result
        return result

    def _chat_request(self, messages, effort, temperature, top_p, max_tokens, seed) -> dict:
        request = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens), "stream": True,
                   "stream_options": {"include_usage": True}}
        request |= {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed)) if v is not None}
        if effort:
            if effort not in EFFORTS:
                raise ValueError(f"reasoning_effort is one of {EFFORTS}, got {effort!r}")
            # vLLM/SGLang/TRT-LLM put it in the harmony system message; transformers serve ignores the field and
            # passes chat_template_kwargs to the template instead (gpt-oss's template reads it; ours ignores it).
            request["reasoning_effort"] = effort
            if self.backend == "transformers":
                request["extra_body"] = {"chat_template_kwargs": {"reasoning_effort": effort}}
        return request

    def _pieces(self, chunk, splitter: ChannelSplitter, timer: _Timer) -> list[tuple[str, str]]:
        if chunk.usage is not None and chunk.usage.completion_tokens is not None:
            timer.server_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            return []
        choice = chunk.choices[0]
        if choice.finish_reason:
            timer.finish_reason = choice.finish_reason
        delta = choice.delta
        extra = delta.model_extra or {}
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        if reasoning or delta.content:
            timer.delta()
        return splitter.feed(reasoning, delta.content)

    # -- raw completions (benchmarks; servers whose chat path cannot render our template) -------------------------
    def stream_text(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0,
                    extra_body: dict | None = None) -> Iterator[ChatEvent]:
        timer = _Timer()
        stream = self._client.completions.create(model=self.model, prompt=prompt, max_tokens=int(max_tokens),
                                                 temperature=temperature, stream=True, extra_body=extra_body or None)
        text = []
        with stream:
            for chunk in stream:
                if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens is not None:
                    timer.server_tokens = chunk.usage.completion_tokens
                piece = chunk.choices[0].text if chunk.choices else ""
                if piece:
                    timer.delta()
                    text.append(piece)
                    yield ChatEvent("final", piece)
        yield ChatEvent("done", result=ChatResult(final="".join(text), stats=timer.stats(), endpoint=self.name))


class _Timer:
    def __init__(self):
        self.start = time.perf_counter()
        self.first = self.last = None
        self.deltas = 0
        self.server_tokens: int | None = None
        self.finish_reason: str | None = None

    def restart(self) -> None:
        self.start = time.perf_counter()

    def delta(self) -> None:
        now = time.perf_counter()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.deltas += 1

    def stats(self) -> ChatStats:
        total = time.perf_counter() - self.start
        tokens = self.server_tokens if self.server_tokens is not None else self.deltas
        stats = ChatStats(total_s=total, tokens=tokens, finish_reason=self.finish_reason,
                          token_source="server usage" if self.server_tokens is not None else "stream deltas")
        if self.first is not None:
            stats.ttft_s = self.first - self.start
            span = self.last - self.first
            stats.decode_tokens_per_s = (tokens - 1) / span if tokens > 1 and span > 0 else None
        stats.e2e_tokens_per_s = tokens / total if total > 0 else None
        return stats


def _error_text(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    detail = body.get("detail") or body.get("message") if isinstance(body, dict) else None
    return f"{type(exc).__name__}: {detail or exc}"


# ------------------------------------------------------------------------------------------------ side by side


def compare(prompt: str, clients: list[ChatClient], **kwargs) -> list[ChatResult]:
    """The same one-turn prompt to each endpoint, one after the other (so timings do not compete for the CPU)."""
    return [client.chat([{"role": "user", "content": prompt}], **kwargs) for client in clients]


def stream_compare(messages_per_client: list[list[dict]], clients: list[ChatClient], timeout: float = 600.0,
                   **kwargs) -> Iterator[tuple[int, ChatEvent]]:
    """All endpoints at once, events interleaved as they arrive: (client index, event). Ends when all are done."""
    events: queue.Queue = queue.Queue()

    def run(index: int, client: ChatClient, messages: list[dict]) -> None:
        try:
            for event in client.stream_chat(messages, **kwargs):
                events.put((index, event))
        finally:
            events.put((index, None))

    for index, (client, messages) in enumerate(zip(clients, messages_per_client)):
        threading.Thread(target=run, args=(index, client, messages), daemon=True, name=f"compare-{index}").start()
    open_streams, deadline = len(clients), time.monotonic() + timeout
    while open_streams and time.monotonic() < deadline:
        try:
            index, event = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if event is None:
            open_streams -= 1
        else:
            yield index, event
