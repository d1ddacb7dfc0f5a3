"""OpenAI's harmony chat format, as used by gpt-oss, for our tokenizers.

A conversation renders as
    <|start|>{role}<|message|>{content}<|end|>                      (system, developer, user)
    <|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>
    <|start|>assistant<|channel|>final<|message|>{content}<|return|>   (<|end|> if not the last turn)
and a generation prompt is `<|start|>assistant`; the model continues with `<|channel|>...`.

`CHAT_TEMPLATE` is the same thing in Jinja for `tokenizer.apply_chat_template`. Everything the model must produce
after the generation prompt sits inside `{% generation %}` so TRL's `assistant_only_loss=True` trains on exactly the
assistant's tokens, including the `<|end|>`/`<|return|>` that teach it to stop.

Pad token: gpt-oss pads with `<|endoftext|>` and so do we (no extra `<|pad|>`), so a checkpoint's special-token
layout matches the real model's. It is never part of a rendered chat, so padding cannot collide with content.
"""

from __future__ import annotations

import re

STARTOFTEXT, ENDOFTEXT = "<|startoftext|>", "<|endoftext|>"
START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CONSTRAIN, CALL = "<|return|>", "<|constrain|>", "<|call|>"
SPECIAL_TOKENS = (STARTOFTEXT, ENDOFTEXT, START, END, MESSAGE, CHANNEL, RETURN, CONSTRAIN, CALL)
EOS_TOKENS = (RETURN, CALL, ENDOFTEXT)  # any of them ends a generation
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = STARTOFTEXT, RETURN, ENDOFTEXT
ROLES = ("system", "developer", "user", "assistant")
GENERATION_PROMPT = f"{START}assistant"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|start|>assistant' -}}"
    "{%- generation -%}"
    "{%- if message.thinking -%}"
    "{{- '<|channel|>analysis<|message|>' + message.thinking + '<|end|><|start|>assistant' -}}"
    "{%- endif -%}"
    "{{- '<|channel|>final<|message|>' + message.content -}}"
    "{{- '<|return|>' if loop.last else '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Plain-Python rendering, the reference the Jinja template is tested against."""
    parts = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            parts.append(f"{START}{message['role']}{MESSAGE}{message['content']}{END}")
            continue
        parts.append(GENERATION_PROMPT)
        if message.get("thinking"):
            parts.append(f"{CHANNEL}analysis{MESSAGE}{message['thinking']}{END}{GENERATION_PROMPT}")
        last = i == len(messages) - 1
        parts.append(f"{CHANNEL}final{MESSAGE}{message['content']}{RETURN if last else END}")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def split_prompt(messages: list[dict]) -> tuple[list[dict], dict | None]:
    """(messages before the last assistant turn, that turn) — the prompt and reference used for evaluation."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]
    return list(messages), None


_STOP_RE = re.compile("|".join(re.escape(t) for t in EOS_TOKENS))
# A channel header, optionally with a `<|constrain|>` part, then the message up to the next marker or the end.
_CHANNEL_RE = re.compile(
    r"<\|channel\|>(?P<channel>\w+)[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>(?P<text>.*?)"
    r"(?=<\|end\|>|<\|start\|>|<\|channel\|>|$)",
    re.DOTALL,
)
# What `decode(skip_special_tokens=True)` leaves: "analysis{thinking}assistantfinal{answer}".
# "assistantfinal" is required after an analysis so a thinking that says "final" is not cut there.
_PLAIN_RE = re.compile(r"^(?:assistant)?(?:analysis(?P<analysis>.*?)assistant)?final(?P<final>.*)$", re.DOTALL)
_PLAIN_ANALYSIS_ONLY_RE = re.compile(r"^(?:assistant)?analysis(?P<analysis>.*)$", re.DOTALL)


def parse_completion(text: str) -> dict:
    """Split a generated continuation of `<|start|>assistant` into its analysis and final message.

    Works on text decoded with or without special tokens and on truncated output (a missing part is "").
    """
    body = text.lstrip()
    if body.startswith(GENERATION_PROMPT):
        body = body[len(GENERATION_PROMPT):]
    if CHANNEL in body or MESSAGE in body:
        return _parse_marked(body, text)
    return _parse_plain(body, text)


def _parse_marked(body: str, raw: str) -> dict:
    body = _STOP_RE.split(body, maxsplit=1)[0]
    found: dict[str, list[str]] = {}
    for match in _CHANNEL_RE.finditer(body):
        found.setdefault(match["channel"], []).append(match["text"])
    if not found and MESSAGE in body:  # a message without a channel header counts as the answer
        found["final"] = [body.split(MESSAGE, 1)[1].split(END, 1)[0]]
    return {"analysis": "\n".join(found.get("analysis", [])).strip(),
            "final": "\n".join(found.get("final", [])).strip(), "raw": raw}


def _parse_plain(body: str, raw: str) -> dict:
    match = _PLAIN_RE.match(body)
    if match:
        return {"analysis": (match["analysis"] or "").strip(), "final": match["final"].strip(), "raw": raw}
    match = _PLAIN_ANALYSIS_ONLY_RE.match(body)
    if match:  # truncated before the final channel
        return {"analysis": match["analysis"].strip(), "final": "", "raw": raw}
    return {"analysis": "", "final": body.strip(), "raw": raw}
