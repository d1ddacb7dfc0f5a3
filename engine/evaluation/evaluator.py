"""The one evaluation every stage gets: eval loss, greedy generation + pass rate, weight quantization error."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from engine.data import harmony
from engine.fp4 import modelopt_glue, torch_backend
from engine.evaluation.scoring import judge


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the loss on assistant tokens only, exactly as SFT trains."""
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(enc["input_ids"])[:max_length]
    mask = list(enc["assistant_masks"])[:max_length]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


@torch.no_grad()
def eval_loss(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per assistant token over all `rows` (the MoE aux loss is not part of it).

    The lm_head runs one row at a time: a batch's float32 logits over gpt-oss's 201,088-token vocabulary were 31 GiB
    for 24 rows of ~1,600 tokens, and ran a gpt-oss-20b evaluation out of memory on the H200 (2026-12-03)."""
    model.eval()
    model.config.output_router_logits = False
    device = next(model.parameters()).device
    pairs = sorted((tokenize_chat(tokenizer, r["messages"], max_length) for r in rows), key=lambda p: len(p[0]))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], device=device)
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
        for row in range(hidden.size(0)):  # one row's logits at a time: see the docstring
            logits = model.get_output_embeddings()(hidden[row, :-1]).float()
            total += torch.nn.functional.cross_entropy(logits, labels[row, 1:], ignore_index=-100,
                                                       reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def reference_of(row: dict) -> str:
    if row.get("reference") is not None:
        return str(row["reference"])
    assistant = [m for m in row["messages"] if m.get("role") == "assistant"]
    return str(assistant[-1].get("content", "")) if assistant else ""


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the last assistant turn: what the model must answer."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return messages[:last]


@torch.no_grad()
def generate_and_judge(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Greedy answers for `rows`, judged by engine.evaluation.scoring. One dict per row, in the order given."""
    model.eval()
    model.config.output_router_logits = False
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in harmony.EOS_TOKENS if t in tokenizer.get_vocab()]
    results: list[dict | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        for i, text in zip(idx, texts):
            text = text.replace(tokenizer.pad_token or "\0", "")
            completion = harmony.parse_completion(text)
            verdict = judge(rows[i], completion)
            results[i] = {"row": rows[i], "completion": completion, "verdict": verdict}
        if on_batch:
            on_batch(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


def pass_rates(results: list[dict]) -> dict[str, float]:
    """Overall and per-task pass rates, plus the half-width of a 95% Wilson interval for the overall one."""
    out: dict[str, float] = {}
    by_task: dict[str, list[bool]] = {}
    for r in results:
        by_task.setdefault(r["row"].get("task") or "default", []).append(bool(r["verdict"]["passed"]))
    everything = [p for ps in by_task.values() for p in ps]
    out["pass_rate"] = sum(everything) / len(everything) if everything else 0.0
    out["pass_rate_ci95"] = wilson_half_width(sum(everything), len(everything))
    out["n_examples"] = float(len(everything))
    for task, passed in sorted(by_task.items()):
        out[f"{task}_pass_rate"] = sum(passed) / len(passed)
    return out


def wilson_half_width(successes: int, n: int, z: float = 1.96) -> float:
    if n == 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom


def load_expert_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Only the MoE expert tensors of a saved model, (E, in, out), read straight from its safetensors files.

    An OpenAI-layout MXFP4 checkpoint (gpt-oss as released, and the embedded MXFP4 base) stores them as
    `_blocks` / `_scales`: decoded here to the values `Mxfp4Config(dequantize=True)` loads (exact in float32)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    names = tuple(f"mlp.experts.{w}" for w in modelopt_glue.EXPERT_WEIGHTS)
    out, packed = {}, {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                if key.endswith(names):
                    out[key] = f.get_tensor(key)
                elif key.endswith(tuple(f"{n}_blocks" for n in names) + tuple(f"{n}_scales" for n in names)):
                    packed[key] = f.get_tensor(key)
    for key in [k for k in packed if k.endswith("_blocks")]:
        base = key.removesuffix("_blocks")
        # (E, out, in/32, 16) blocks + (E, out, in/32) scales -> (E, out, in) -> transformers' (E, in, out)
        out[base] = torch_backend.mxfp4_decode(packed[key], packed[f"{base}_scales"], torch.float32).transpose(-1, -2)
    return out


def weight_errors(model, reference: dict[str, torch.Tensor] | None) -> dict:
    """Relative Frobenius error of the weights the model computes with, vs the SFT weights and vs its own masters."""
    effective = modelopt_glue.effective_expert_weights(model)
    masters = {item.name: item.weight.detach() for item in modelopt_glue.expert_weights(model)}
    own = modelopt_glue.relative_weight_error(effective, masters)
    out = {"quant_rel_error": own["overall"], "per_tensor_quant_rel_error": own["per_tensor"]}
    if reference:
        missing = set(effective) - set(reference)
        if missing:
            raise KeyError(f"reference weights lack {sorted(missing)[:3]}")
        vs_ref = modelopt_glue.relative_weight_error(effective, {k: reference[k].to(effective[k].device) for k in effective})
        out["weight_rel_error"] = vs_ref["overall"]
        out["per_tensor_weight_rel_error"] = vs_ref["per_tensor"]
    return out
