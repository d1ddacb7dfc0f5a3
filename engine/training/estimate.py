"""Will it fit? A rough per-GPU memory and step-time estimate for SFT / QAT of a gpt-oss model, before anything loads.

    estimate("openai/gpt-oss-20b", method="full", gpus=8, strategy="deepspeed_zero3", batch=1, seq=4096)

The model is a config dict (config.json's keys), a path to a checkpoint dir / config.json, or a known name
(gpt-oss-20b / gpt-oss-120b, configs below: nothing is downloaded). The formula, in bytes per GPU:

  parameters P (exact for transformers' GptOss): embeddings + lm_head (untied), per layer attention (q, k, v, o with
      biases, sinks), router, experts (gate_up E*H*2I + down E*I*H, with biases), norms.
  weights / grads / optimizer, bytes per parameter (d = bytes of `dtype`):
      single, ddp       d / d / 2d   the model trains in `dtype`, AdamW moments in the parameter dtype (HF Trainer)
      fsdp2             4 / 4 / 8    accelerate keeps FSDP2's sharded parameters in fp32 for mixed precision
      deepspeed_zero3   d / d / 8+4  ZeRO-3 keeps an fp32 master copy and fp32 Adam moments
      LoRA: the frozen base costs only its weights; adapters are fp32 (peft upcasts them): 4 / 4 / 8.
      fsdp2 and zero3 divide all of it by the GPU count and add two gathered layers (the one computing, the one
      prefetched) in `dtype`; single and ddp hold everything on each GPU.
  activations (bf16, t = batch * seq tokens per GPU):
      per layer     t * (18 H + 4 k I) * 2          hidden-size tensors, plus the k routed experts' 2I + I outputs
      attention     batch * heads * seq^2 * 6       eager attention keeps scores and probs
                    t * heads * (2 head_dim + 8)    flex attention (hardware.attention; engine/training/attention.py):
                                                    no scores: flex's bf16 output, the fp32 lse and sink gate
      logits        t * vocab * 6                   full-logits loss: bf16 logits and their fp32 upcast
                    4096 * 32768 * 2 + t * H * 6    chunked loss (hardware.chunked_loss, TRL's fused LM head): one
                    (+ vocab * H * 4 when lm_head   [4096 tokens, 32768 vocab] tile, the selected hidden states and
                    trains, i.e. not LoRA)          their fp32 gradient, the fp32 lm_head gradient accumulator
      gradient checkpointing keeps each layer's input (t * H * 2 per layer) and recomputes one layer at a time.
  overhead      1.5 GiB per GPU: CUDA context and allocator slack.
Calibration: docs/benchmarks.md measured 28.3 GiB peak for a 2-layer gpt-oss-20b-shaped model (batch 4 x 1024, no
checkpointing, bf16, AdamW); this formula gives 30.0 GiB without the overhead (tests/test_estimate.py). Expect +-20%.

Time: 6 x active parameters FLOPs per token for full training (4x for LoRA: no weight gradients of the base) plus
attention (QK^T and PV, forward and backward: eager computes every [T, T] score; flex skips the blocks its mask
rules out: half of a full-attention layer's, all but the window of a sliding one), at `mfu` (default 0.2: what our engine reached in that benchmark, 39k tokens/s on an H100) of the
card's bf16 peak. QAT on the engine's fast experts path costs about the same as SFT (1.07x, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GIB = 1024**3
OVERHEAD_GIB = 1.5
FIT_MARGIN = 0.92  # "fits" below 92% of the card: fragmentation and peaks the formula does not see
DEFAULT_GPU_GIB = 80.0  # an H100 / A100 80GB, when NVML is absent and no size is given
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}
ACT_HIDDEN, ACT_EXPERT, ATTN_BYTES, LOGIT_BYTES = 18, 4, 6, 6
FLEX_FP32_PER_QUERY = 8  # flex attention: the fp32 lse and the fp32 sink gate, per query and head
FLEX_BLOCK = 128  # create_block_mask's default block size: flex skips or computes whole blocks
LOSS_TILE_BYTES = 4096 * 32768 * 2  # TRL's chunked loss: one bf16 [tokens, vocab] tile (trl.kernels.chunked_logprob)
STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed_zero3")

_GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "num_experts_per_tok": 4,
            "tie_word_embeddings": False}
KNOWN = {
    "gpt-oss-20b": {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128},
}


# ------------------------------------------------------------------------------------------------- the model


def load_config(model: dict | str | Path) -> dict:
    if isinstance(model, dict):
        return model
    name = str(model).rsplit("/", 1)[-1].lower()
    if name in KNOWN and not Path(model).exists():
        return KNOWN[name]
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{model}: not a config dict, a checkpoint dir, a config.json or one of {list(KNOWN)}")
    return json.loads(path.read_text())


def parameter_counts(c: dict) -> dict:
    """Exact parameter counts of transformers' GptOss from its config."""
    h, inter, layers, experts = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd
    attention = (h * q + q) + 2 * (h * k + k) + (q * h + h) + heads  # q, k, v, o (with biases) + sinks
    router = h * experts + experts
    expert = experts * (h * 2 * inter + 2 * inter + inter * h + h)  # gate_up + down, with biases
    norms = 2 * h * layers + h
    embed = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    total = layers * (attention + router + expert) + norms + embed
    return {"total": total, "experts": layers * expert, "attention": layers * attention, "embeddings": embed,
            "per_layer": attention + router + expert + 2 * h}


def active_parameters(c: dict, counts: dict) -> int:
    """Parameters a token multiplies with: everything but the unrouted experts (and the embedding lookup)."""
    routed = counts["experts"] * c["num_experts_per_tok"] / c["num_local_experts"]
    lm_head = c["vocab_size"] * c["hidden_size"]
    return int(counts["total"] - counts["experts"] - counts["embeddings"] + routed + lm_head)


def lora_parameters(c: dict, r: int, target_experts: bool, expert_layers: int | None = None) -> int:
    """peft LoRA on q/k/v/o ('all-linear') plus, optionally, the experts (one A/B pair per expert and weight)."""
    h, inter, layers, experts = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, k = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attention = r * ((h + q) + 2 * (h + k) + (q + h))
    expert = r * experts * ((h + 2 * inter) + (inter + h)) if target_experts else 0
    return layers * attention + (layers if expert_layers is None else expert_layers) * expert


# ------------------------------------------------------------------------------------------------- memory


def state_bytes(counts: dict, method: str, strategy: str, dtype_bytes: int, lora_params: int) -> dict:
    """Weights, gradients and optimizer states in bytes on one GPU before sharding (see the module doc)."""
    p = counts["total"]
    if method == "lora":
        base = 4 if strategy == "fsdp2" else dtype_bytes
        return {"weights": p * base + lora_params * 4, "grads": lora_params * 4, "optimizer": lora_params * 8}
    if strategy == "fsdp2":
        return {"weights": p * 4, "grads": p * 4, "optimizer": p * 8}
    if strategy == "deepspeed_zero3":
        master = 4 if dtype_bytes < 4 else 0
        return {"weights": p * dtype_bytes, "grads": p * dtype_bytes, "optimizer": p * (8 + master)}
    return {"weights": p * dtype_bytes, "grads": p * dtype_bytes, "optimizer": p * 2 * dtype_bytes}


def activation_bytes(c: dict, batch: int, seq: int, gradient_checkpointing: bool, attention_kind: str = "eager",
                     chunked_loss: bool = False, lm_head_trains: bool = True) -> dict:
    tokens, h = batch * seq, c["hidden_size"]
    layer = tokens * (ACT_HIDDEN * h + ACT_EXPERT * c["num_experts_per_tok"] * c["intermediate_size"]) * 2
    if attention_kind == "flex":
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        attention = tokens * c["num_attention_heads"] * (2 * hd + FLEX_FP32_PER_QUERY)
    else:
        attention = batch * c["num_attention_heads"] * seq * seq * ATTN_BYTES
    if chunked_loss:
        logits = LOSS_TILE_BYTES + tokens * h * 6 + (c["vocab_size"] * h * 4 if lm_head_trains else 0)
    else:
        logits = tokens * c["vocab_size"] * LOGIT_BYTES
    layers = c["num_hidden_layers"]
    if gradient_checkpointing:
        kept = layers * tokens * h * 2 + layer + attention  # checkpointed inputs + the one layer being recomputed
    else:
        kept = layers * (layer + attention)
    return {"layers": kept, "logits": logits, "total": kept + logits}


def available_gib(gpu_memory_gib: float | None, limit_gib: float | None = None) -> tuple[float, str]:
    """(GiB a job may use, where that number comes from). The card's memory: NVML when a GPU is visible, else
    `gpu_memory_gib`, else an 80 GB card. With `limit_gib` (hardware.gpu_memory_limit_gib, which caps every job's
    allocator at that size: engine/runtime/gpu_memory.py) the limit, so "will it fit?" answers for the capped card."""
    card, source = _card_gib(gpu_memory_gib)
    if limit_gib is None:
        return card, source
    return float(limit_gib), f"hardware.gpu_memory_limit_gib (card: {card:.0f} GiB, {source})"


def _card_gib(gpu_memory_gib: float | None) -> tuple[float, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, f"NVML: {pynvml.nvmlDeviceGetName(handle)}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: all mean "not measured"
        pass
    if gpu_memory_gib is not None:
        return float(gpu_memory_gib), "given"
    return DEFAULT_GPU_GIB, "assumed (no GPU visible): 80 GB card"


def per_gpu(c: dict, counts: dict, method: str, gpus: int, strategy: str, batch: int, seq: int, dtype_bytes: int,
            gradient_checkpointing: bool, lora_params: int, attention: str = "eager", chunked_loss: bool = False) -> dict:
    """GiB per GPU: weights, grads, optimizer, gathered layers, activations, overhead, total."""
    states = state_bytes(counts, method, strategy, dtype_bytes, lora_params)
    sharded = strategy in ("fsdp2", "deepspeed_zero3")
    out = {k: v / (gpus if sharded else 1) / GIB for k, v in states.items()}
    out["gathered_layers"] = 2 * counts["per_layer"] * dtype_bytes / GIB if sharded and gpus > 1 else 0.0
    out["activations"] = activation_bytes(c, batch, seq, gradient_checkpointing, attention, chunked_loss,
                                          lm_head_trains=method == "full")["total"] / GIB
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- time


def attended_keys(c: dict, seq: int, attention: str) -> float:
    """Keys each query multiplies with, summed over the layers: eager computes all `seq` of them in every layer;
    flex skips the blocks (FLEX_BLOCK x FLEX_BLOCK) its mask rules out but computes partly masked ones whole: about
    seq / 2 + one block in a full (causal) layer, the window + one block in a sliding one."""
    layers = c["num_hidden_layers"]
    if attention != "flex":
        return layers * seq
    types = c.get("layer_types") or ["sliding_attention", "full_attention"] * (layers // 2) + \
        ["sliding_attention"] * (layers % 2)  # gpt-oss alternates, sliding first
    sliding = sum(t == "sliding_attention" for t in types)
    window = c.get("sliding_window") or 128
    full = min(seq, seq / 2 + FLEX_BLOCK / 2)
    return (layers - sliding) * full + sliding * min(seq, window + FLEX_BLOCK)


def step_time(c: dict, counts: dict, method: str, gpus: int, batch: int, seq: int, mfu: float,
              peak_tflops: float, attention: str = "eager") -> dict:
    """Seconds per optimizer step with one micro-batch of `batch` x `seq` per GPU, and tokens/s over all GPUs."""
    per_token = (6 if method == "full" else 4) * active_parameters(c, counts)
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token += 12 * attended_keys(c, seq, attention) * c["num_attention_heads"] * hd  # QK^T and PV, fwd + bwd
    seconds = batch * seq * per_token / (peak_tflops * 1e12 * mfu)
    return {"flops_per_token": per_token, "step_s": round(seconds, 3),
            "tokens_per_s": round(gpus * batch * seq / seconds), "mfu": mfu, "peak_tflops": peak_tflops}


def peak_tflops_for(source: str) -> float:
    return next((v for name, v in PEAK_BF16_TFLOPS.items() if name in source), PEAK_BF16_TFLOPS["H100"])


# ------------------------------------------------------------------------------------------------- verdict


def estimate(model: dict | str | Path, method: str = "full", gpus: int = 1, strategy: str = "single", batch: int = 1,
             seq: int = 4096, dtype: str = "bfloat16", *, gpu_memory_gib: float | None = None,
             gpu_memory_limit_gib: float | None = None, gradient_checkpointing: bool = True, lora_r: int = 8,
             lora_target_experts: bool = False, mfu: float = 0.2, attention: str = "eager", chunked_loss: bool = False) -> dict:
    """Memory per GPU (GiB) against what the card has, a verdict, suggestions, and a step-time estimate.
    `attention` ('eager' or 'flex') and `chunked_loss` are the resolved hardware.attention / chunked_loss;
    `gpu_memory_limit_gib` (hardware.gpu_memory_limit_gib) replaces the card's memory when set."""
    _check_args(method, gpus, strategy, batch, seq, dtype)
    if attention not in ("eager", "flex"):
        raise ValueError(f"attention must be 'eager' or 'flex', not {attention!r}")
    c = load_config(model)
    counts = parameter_counts(c)
    dtype_bytes = 4 if dtype == "float32" else 2
    lora_params = lora_parameters(c, lora_r, lora_target_experts) if method == "lora" else 0
    available, source = available_gib(gpu_memory_gib, gpu_memory_limit_gib)

    def memory(m: str, n: int, s: str) -> dict:
        lp = lora_parameters(c, lora_r, lora_target_experts) if m == "lora" else 0
        return per_gpu(c, counts, m, n, s, batch, seq, dtype_bytes, gradient_checkpointing, lp, attention,
                       chunked_loss and s != "fsdp2")

    mem = memory(method, gpus, strategy)
    verdict = _verdict(mem["total"], available)
    result = {
        "parameters": counts["total"], "trainable_parameters": lora_params if method == "lora" else counts["total"],
        "method": method, "gpus": gpus, "strategy": strategy, "batch": batch, "seq": seq, "dtype": dtype,
        "attention": attention, "chunked_loss": chunked_loss,
        "per_gpu_gib": mem, "available_gib": round(available, 2), "available_source": source, "verdict": verdict,
        "time": step_time(c, counts, method, gpus, batch, seq, mfu, peak_tflops_for(source), attention),
    }
    result["suggestions"] = [] if verdict == "fits" else _suggestions(memory, mem, method, gpus, available,
                                                                      gradient_checkpointing, batch)
    return result


def _check_args(method: str, gpus: int, strategy: str, batch: int, seq: int, dtype: str) -> None:
    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', not {method!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if gpus < 1 or batch < 1 or seq < 1:
        raise ValueError("gpus, batch and seq must be at least 1")
    if strategy == "single" and gpus != 1:
        raise ValueError("strategy 'single' runs on one GPU; pick ddp, fsdp2 or deepspeed_zero3 for more")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, not {dtype!r}")


def _verdict(total: float, available: float) -> str:
    if total <= FIT_MARGIN * available:
        return "fits"
    return "tight" if total <= available else "does not fit"


def _suggestions(memory, mem: dict, method: str, gpus: int, available: float, checkpointing: bool,
                 batch: int) -> list[str]:
    """Ways to fit, cheapest first: LoRA on the same GPUs, then more GPUs with ZeRO-3, then smaller activations."""
    out = []
    if method == "full":
        lora = memory("lora", gpus, "single" if gpus == 1 else "ddp")
        if _verdict(lora["total"], available) == "fits":
            out.append(f"use LoRA (method lora): about {lora['total']:.0f} GiB per GPU")
    for n in (2, 4, 8, 16, 32, 64, 128, 256):
        if n <= gpus and method == "full":
            continue
        sharded = memory("full", n, "deepspeed_zero3")
        if _verdict(sharded["total"], available) == "fits":
            out.append(f"use {n} GPUs with ZeRO-3 (strategy deepspeed_zero3, full fine-tuning): about "
                       f"{sharded['total']:.0f} GiB per GPU" + (f" ({math.ceil(n / 8)} nodes of 8)" if n > 8 else ""))
            break
    if not checkpointing and mem["activations"] > 0.25 * mem["total"]:
        out.append("turn on gradient_checkpointing (activations are "
                   f"{mem['activations']:.0f} of {mem['total']:.0f} GiB)")
    if batch > 1 and mem["activations"] > 0.25 * mem["total"]:
        out.append("lower per_device_train_batch_size and raise gradient_accumulation_steps (same global batch)")
    if not out:
        out.append("shorten data.max_length (sequence length) or use GPUs with more memory")
    return out


# ------------------------------------------------------------------------------------------------- from a recipe


def estimate_recipe(recipe, stage: str, cuda: bool, gpu_memory_gib: float | None = None) -> dict:
    """`estimate` for a recipe's SFT or QAT stage: its model, LoRA or full, GPUs, strategy, batch and length.

    Raises ValueError naming the field when the model's shape cannot be known before loading it (a hub id other
    than gpt-oss-20b / -120b, or a directory without config.json).
    """
    from engine.recipe.configs import EMBEDDED_MODEL

    train = getattr(recipe, stage)
    hw = recipe.hardware
    source = recipe.model.source
    if source == EMBEDDED_MODEL:
        from engine.data.embedded_model import VOCAB_SIZE, tiny_config

        model = tiny_config(VOCAB_SIZE).to_dict()
    else:
        try:
            model = load_config(source)
        except FileNotFoundError:
            raise ValueError(f"model.source: {source!r}: no config.json to size it from; estimates know local "
                             f"checkpoint dirs and {', '.join(KNOWN)}") from None
    dtype = {"bfloat16": "bfloat16", "float32": "float32"}.get(recipe.model.dtype, "bfloat16" if cuda else "float32")
    from engine.training.attention import resolve  # what the trainer runs (imports torch: on the button's click)

    attention = resolve(hw.attention, "cuda" if cuda else "cpu", recipe.data.max_length)
    chunked = hw.chunked_loss == "on" or (hw.chunked_loss == "auto" and hw.strategy != "fsdp2")
    result = estimate(model, method="lora" if train.lora else "full", gpus=hw.num_processes,
                      strategy=hw.strategy, batch=train.per_device_train_batch_size, seq=recipe.data.max_length,
                      dtype=dtype, gpu_memory_gib=gpu_memory_gib, gpu_memory_limit_gib=hw.gpu_memory_limit_gib,
                      gradient_checkpointing=train.gradient_checkpointing,
                      lora_r=train.lora_r, lora_target_experts=train.lora_target_experts, attention=attention,
                      chunked_loss=chunked)
    result["disk_gib"] = disk_estimate(recipe, model, 4 if dtype == "float32" else 2)
    return result


# ------------------------------------------------------------------------------------------------- disk

CHECKPOINTS_KEPT = 2  # the Trainer's save_total_limit (engine/training/hf_trainer.py)
ADAM_BYTES = 8  # two fp32 moments per trained adapter parameter (adapters are fp32); dtype-sized for full training


def disk_estimate(recipe, c: dict, dtype_bytes: int = 2) -> dict:
    """GiB the run writes under runs/<id>/ (the base model stays where it is and is not copied), by part.

    What each stage keeps (engine/training/stage_outputs.py): LoRA SFT / QAT their adapters (fp32) and up to two
    resumable checkpoints (adapters + AdamW moments); full SFT / QAT a whole model in the training dtype and
    checkpoints of weights + moments; PTQ its quantizers (scalar amax values: kilobytes); exports the FP4 experts
    (4 bits + one scale byte per block: 32 for MXFP4 and NVFP4 weight-only, 16 for W4A4) and the rest in BF16.
    Nothing is deleted during a run, so the total is also the peak, plus the one output being written (`.tmp`).
    """
    counts = parameter_counts(c)
    total, expert = counts["total"], counts["experts"]
    out: dict[str, float] = {}
    formats = list(recipe.ptq.formats) if recipe.qat.enabled or recipe.ptq.formats else []
    for stage, runs in (("sft", 1), ("qat", len(formats))):
        train = getattr(recipe, stage)
        if not train.enabled or not runs:
            continue
        if train.lora:
            layers = None if train.lora_expert_layers is None else len(train.lora_expert_layers)
            trained = lora_parameters(c, train.lora_r, train.lora_target_experts, layers)
            model_bytes, moment_bytes = trained * 4, trained * ADAM_BYTES
        else:
            model_bytes, moment_bytes = total * dtype_bytes, total * 2 * dtype_bytes
        saves = CHECKPOINTS_KEPT if train.max_steps < 0 else min(CHECKPOINTS_KEPT, train.max_steps // train.save_steps)
        out[stage] = runs * (model_bytes + saves * (model_bytes + moment_bytes)) / GIB
    if formats:
        out["ptq"] = len(formats) * 1e6 / GIB  # quantizer state: well under a megabyte each
    if recipe.export.enabled and recipe.qat.enabled:
        other = (total - expert) * 2
        for fmt in formats:
            block = 16 if fmt == "nvfp4_w4a4" else 32
            out[f"export {fmt}"] = (expert * (0.5 + 1 / block) + other) / GIB
    out["total"] = sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}
