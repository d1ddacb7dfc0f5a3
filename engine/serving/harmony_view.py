"""Harmony channels through `transformers serve`: give its tokenizer a response template.

`transformers serve` (5.24) decodes with `skip_special_tokens=True` unless the tokenizer carries a
`response_template` (or the model type has a built-in one: gpt_oss has none). Without one, a gpt-oss reply arrives
as "analysis{thinking}assistantfinal{answer}": the channel markers are gone and only guesswork can split them.
With the template below, transformers' own ResponseParser keeps the special tokens internally and returns the
analysis channel as `reasoning_content` and the final channel as `content`, streamed token by token.

We never edit an export: the server gets a *view* of it (a directory of symlinks to the same files) whose
tokenizer_config.json adds the template. A checkpoint whose tokenizer already has one is served as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.data.harmony import CHANNEL, END, GENERATION_PROMPT, MESSAGE, RETURN

HARMONY_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    # The prompt ends with `<|start|>assistant`; so does the header between the analysis and the final message.
    "start_anchor": GENERATION_PROMPT,
    "fields": {
        "reasoning_content": {"open": f"{CHANNEL}analysis{MESSAGE}", "close": END, "content": "text"},
        "content": {"open": f"{CHANNEL}final{MESSAGE}", "close": [RETURN, END], "content": "text"},
    },
}
TOKENIZER_CONFIG = "tokenizer_config.json"


def needs_view(model_dir: Path) -> bool:
    """A harmony tokenizer (chat template with <|channel|>) without a response template."""
    try:
        config = json.loads((model_dir / TOKENIZER_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    template = str(config.get("chat_template") or "")
    if not template and (model_dir / "chat_template.jinja").is_file():  # transformers 5 saves it beside by default
        template = (model_dir / "chat_template.jinja").read_text()
    return "<|channel|>" in template and not config.get("response_template")


def make_view(model_dir: Path, view_dir: Path) -> Path:
    """`view_dir` with a symlink to every entry of `model_dir`, except a tokenizer_config.json with the template."""
    model_dir = Path(model_dir).resolve()
    view_dir.mkdir(parents=True, exist_ok=True)
    for entry in model_dir.iterdir():
        target = view_dir / entry.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if entry.name == TOKENIZER_CONFIG:
            config = json.loads(entry.read_text())
            config["response_template"] = HARMONY_RESPONSE_TEMPLATE
            target.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        else:
            os.symlink(entry, target)
    return view_dir


def served_dir(model_path: str | Path, server_dir: Path) -> str:
    """What to hand `transformers serve`: the checkpoint itself, or a view of it under `server_dir`."""
    model_dir = Path(model_path)
    if model_dir.is_dir() and needs_view(model_dir):
        return str(make_view(model_dir, server_dir / "model"))
    return str(model_path)
