"""The one evaluation every stage gets: eval loss, greedy generation + pass rate, weight quantization error."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from engine.data import chat_data, harmony
from engine.fp4 import modelopt_glue, torch_backend
from engine.evaluation.scoring import judge


GENERATE_CPU_BATCH = 64  # the recipe's former default: CPU evaluations stay bit for bit what they were
LOSS_CPU_BATCH = 32
AUTO_MEMORY_SHARE = 0.5  # of the free GPU memory; the rest for the allocator's fragmentation and what else runs
AUTO_MAX_BATCH = 4096


def row_bytes(config, tokens: int, dtype_bytes: int = 2) -> int:
    """An upper bound on the GPU memory one row of a generation / eval-loss batch needs at `tokens` tokens.

    KV cache of every layer + one layer's eager attention scores and probabilities in float32 ([heads, T, T] twice,
    sliding windows ignored) + one layer's MLP activations (the routed experts' gate_up and down outputs, float32
    router and residual copies) + the float32 logits of one position (generation keeps the last one only)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes * tokens
    scores = 2 * heads * tokens * tokens * 4
    routed = getattr(text, "num_experts_per_tok", 1)
    mlp = tokens * (routed * 3 * text.intermediate_size * dtype_bytes + 8 * text.hidden_size * 4)
    return kv + scores + mlp + 2 * text.vocab_size * 4


def pick_batch_size(device_type: str, free_bytes: int, bytes_per_row: int, n_rows: int, cpu_default: int) -> int:
    """The 'auto' batch size: `cpu_default` off CUDA; on CUDA the rows that AUTO_MEMORY_SHARE of the free memory
    holds, at most all of them (and AUTO_MAX_BATCH). Why bigger on CUDA: a decode step of the demo's 1M-parameter
    model is launch-bound (~19 batches x 96 steps per evaluation at 64), so one batch of 1,200 costs ~1/19th."""
    if device_type != "cuda":
        return cpu_default
    fits = int(free_bytes * AUTO_MEMORY_SHARE) // max(bytes_per_row, 1)
    return max(1, min(fits, n_rows, AUTO_MAX_BATCH))


def usable_free_bytes(free: int, total: int, reserved: int, allocated: int, fraction: float = 1.0) -> int:
    """Memory this process may still fill: what CUDA reports free, but no more than the allocator's cap lets it
    reserve (`fraction` of the card, from hardware.gpu_memory_limit_gib; 1.0 = no cap), plus what it holds reserved
    but unused (the eval loss's activations, just freed, stay reserved). Without the cap the free memory of a 141 GB
    card would size batches that a job capped at 79 GiB cannot hold."""
    may_reserve = min(free, max(0, int(fraction * total) - reserved))
    return may_reserve + reserved - allocated


def auto_batch_size(model, tokens: int, n_rows: int, cpu_default: int) -> int:
    """`pick_batch_size` for this model on its device, with the memory it may still use now (`usable_free_bytes`)."""
    parameter = next(model.parameters())
    free = 0
    if parameter.device.type == "cuda":
        device = parameter.device
        free = usable_free_bytes(*torch.cuda.mem_get_info(device), torch.cuda.memory_reserved(device),
                                 torch.cuda.memory_allocated(device), torch.cuda.get_per_process_memory_fraction(device))
    dtype_bytes = max(parameter.element_size(), 2)
    return pick_batch_size(parameter.device.type, free, row_bytes(model.config, tokens, dtype_bytes), n_rows,
                           cpu_default)


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the loss on assistant tokens only, exactly as SFT trains."""
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(enc["input_ids"])[:max_length]
    mask = list(enc["assistant_masks"])[:max_length]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


_TOKENIZED: dict[tuple, list] = {}  # the latest eval set's tokenization (tokenized_by_length)


def tokenized_by_length(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """`tokenize_chat` of every row, shortest first. Kept for the next call with the same rows and tokenizer: a
    chained run evaluates six models on the same 1,200 eval rows (the demo), and tokenizing them with the chat
    template took 0.6 s each time on 2 CPU cores."""
    digest = chat_data.tokenizer_digest(tokenizer)
    key = (digest, max_length, chat_data.rows_digest([r["messages"] for r in rows]))
    if digest is not None and key in _TOKENIZED:
        return _TOKENIZED[key]
    pairs = sorted((tokenize_chat(tokenizer, r["messages"], max_length) for r in rows), key=lambda p: len(p[0]))
    if digest is not None:
        _TOKENIZED.clear()
        _TOKENIZED[key] = pairs
    return pairs


@torch.no_grad()
def eval_loss(model, tokenizer, rows: list[dict], max_length: int, batch_size: int | str = LOSS_CPU_BATCH) -> float:
    """Mean cross-entropy per assistant token over all `rows` (the MoE aux loss is not part of it).

    The lm_head runs one row at a time: a batch's float32 logits over gpt-oss's 201,088-token vocabulary were 31 GiB
    for 24 rows of ~1,600 tokens, and ran a gpt-oss-20b evaluation out of memory on the H200 (2026-12-03).
    The per-row sums add up on the device in float64 (the same additions a Python float made, without one host sync
    per row: 1,200 of them per demo evaluation). `batch_size` 'auto': see `auto_batch_size`."""
    model.eval()
    model.config.output_router_logits = False
    device = next(model.parameters()).device
    pairs = tokenized_by_length(tokenizer, rows, max_length)
    if batch_size == "auto":
        width = max((len(ids) for ids, _ in pairs), default=1)
        batch_size = auto_batch_size(model, width, len(pairs), cpu_default=LOSS_CPU_BATCH)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
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
                                                       reduction="sum").double()
        count += int((labels[:, 1:] != -100).sum())
    return total.item() / max(count, 1)


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
    batch_size: int | str,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Greedy answers for `rows`, judged by engine.evaluation.scoring. One dict per row, in the order given.

    Left padding + the attention mask make each row's greedy answer independent of its batch (checked on CPU in
    tests/test_eval_batching.py), so `batch_size` 'auto' (see `auto_batch_size`) changes speed, not answers."""
    model.eval()
    model.config.output_router_logits = False
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    if batch_size == "auto" and device.type != "cuda":
        batch_size = GENERATE_CPU_BATCH  # as auto_batch_size would say, without tokenizing every prompt for it
    elif batch_size == "auto":
        longest = max((len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]), default=1)
        batch_size = auto_batch_size(model, longest + max_new_tokens, len(rows), cpu_default=GENERATE_CPU_BATCH)
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
