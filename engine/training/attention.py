"""gpt-oss attention for training through PyTorch's flex_attention: sinks, sliding window, GQA, padding.

Eager attention (transformers' `eager_attention_forward`, what the app trained with so far) builds a
[batch, 64 heads, T, T] score tensor per layer, concatenates the sink column and softmaxes it in bf16: at T = 16k
that is 32 GiB per tensor (Unsloth reports gpt-oss-20b stopping near 9k tokens of context on an 80 GB card).
flex_attention, compiled, is a fused kernel with a backward that never materialises the scores and skips the blocks
the mask rules out (the sliding-window layers cost O(T * 128), not O(T^2)).

The sinks. gpt-oss adds one learned logit per head to each softmax's denominator:
    out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink)) = flex_out * sigmoid(lse - sink)
where lse = log sum_j exp(s_j) is the row's logsumexp, which flex returns (in fp32). Autograd carries the gradient
to q, k, v (through flex_out and the lse: flex's backward takes the lse's gradient) and to the sinks. Measured on an
H200 (torch 2.11, /work/shared/NOTES.md): output and q/k/v/sink gradients within 2-4e-3 of an fp32 reference at
64/8 heads, T = 4096. A fully masked row (a left-padded query) has lse = -inf: gate 0, output 0, as eager gives.

Why not transformers' own "flex_attention" (which also renormalises by the sink through the lse): it rounds the
lse to the model dtype (bf16) before the renormalisation, and it refuses sinks on CPU. Ours keeps the lse and the
gate in fp32, and registers its own mask builder (`block_mask`) under the same name in transformers' mask registry:
transformers still decides, per layer type, which mask a layer gets, and the BlockMask holds eager's predicate
(`kv_idx <= q_idx`, `q_idx - kv_idx < sliding_window`: 128 keys in the window, the query's own included; flex's own
sliding-window example attends to 129) and the same padding mask, in one fixed form that compiles once (see
`block_mask`: transformers' `flex_attention_mask` recompiles per layer type and padding). GQA: `enable_gqa=True`,
K/V are never repeated.

Devices. On CUDA, `torch.compile(flex_attention)`. torch's public flex_attention refuses backward on CPU (2.13:
"FlexAttention does not support backward on CPU", compiled or not); there we call its dense reference (the flex
higher-order op run eagerly: differentiable, the same op the compiled kernel is lowered from). It materialises the
scores like eager: it exists so that the CPU tests check our sink math, masks and gradients against eager on the
whole model. `hardware.attention: auto` runs eager on CPU, so the CPU path is what it was, and on CUDA only from
data.max_length 1024 on (AUTO_FLEX_MIN_LENGTH: below it the compile costs more than the kernel saves).
"""

from __future__ import annotations

import functools
import math

import torch

NAME = "gpt_oss_flex"  # the attn_implementation name registered with transformers
CHOICES = ("auto", "eager", "flex")
# `hardware.attention: auto` is flex on CUDA from this data.max_length on, eager below it and on CPU (issue 14).
# Measured on an H200 (docs/benchmarks.md, 2026-12-03; tests/test_attention_gpu.py all passed there the same day):
# at T = 1024 (gpt-oss-20b's shape cut to 2 layers, batch 4) flex + chunked loss took 0.090 s a BF16 step against
# eager's 0.095 (QAT 0.093 vs 0.102) and peaked at 21.6 GiB against 28.3, because eager builds a [batch, 64, T, T]
# score tensor per layer. That gain grows with T; below 1024 it shrinks to little while Inductor's compile of the
# kernel costs tens of seconds in every training process: the demo (max_length 256, a few dozen steps of a tiny
# model) would pay far more than it saves. So short recipes keep eager, which is also what they ran before.
AUTO_FLEX_MIN_LENGTH = 1024


def resolve(choice: str, device: torch.device | str, max_length: int | None) -> str:
    """'eager' or 'flex' for a recipe's `hardware.attention` on `device` with `data.max_length` (the trainer and the
    estimator both ask here, so the estimate sizes what runs).

    'auto' is flex on CUDA when max_length >= AUTO_FLEX_MIN_LENGTH (see there for the measured reason), eager
    otherwise; on CPU always eager: flex has no compiled backward there (its dense reference is as slow as eager),
    so the CPU path stays bit-identical."""
    if choice not in CHOICES:
        raise ValueError(f"hardware.attention must be one of {CHOICES}, not {choice!r}")
    if choice != "auto":
        return choice
    if torch.device(device).type != "cuda":
        return "eager"
    if max_length is None:
        raise ValueError("hardware.attention 'auto' on CUDA depends on data.max_length: pass it")
    return "flex" if max_length >= AUTO_FLEX_MIN_LENGTH else "eager"


def register() -> str:
    """Register our attention and its mask builder with transformers (idempotent); returns the name to use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sink_flex_attention)
    AttentionMaskInterface.register(NAME, block_mask)
    return NAME


def block_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               device="cpu", config=None, **kwargs):
    """The BlockMask for one of transformers' mask calls (its AttentionMaskInterface signature): causal or causal +
    sliding window, AND the 2-D padding mask, with one mask_mod of a fixed form for every layer type and batch.

    Why not transformers' `flex_attention_mask`: it composes closures that differ between full and sliding layers
    and between padded and unpadded batches, and compiled flex_attention guards on the mask_mod's code, so each
    combination compiles anew; with lengths varying per batch (static, then dynamic shapes) that reaches torch's
    recompile limit (8), after which flex runs uncompiled, materialising the scores. Counted on CPU with a counting
    backend over the batches of tests/test_attention.py (lengths 140..300, padded or not): transformers' masks reach
    the limit; this mask stays at 3 graphs (static, dynamic length, dynamic block count). The window and padding
    travel as tensors, which the guards check by shape only.
    `mask_function` (transformers' causal or sliding-window function) is only read to learn which of the two this
    call is, on an index grid; anything else (packed sequences, overlays) is refused rather than silently dropped.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if q_offset or kv_offset:
        raise ValueError(f"{NAME} is for training: no KV cache (got offsets {q_offset}, {kv_offset})")
    window = _window_of(mask_function, getattr(config, "sliding_window", None))
    if attention_mask is None:
        padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(f"{NAME}: a padding mask of {attention_mask.shape[-1]} positions for {kv_length} keys "
                             "(training runs without a KV cache: they must match)")
        padding = attention_mask.bool().to(device)
    limit = torch.tensor(window if window is not None else kv_length + 1, device=device)
    compile_it = torch.device(device).type == "cuda"  # on CPU an Inductor C++ build per shape: 12 s vs 0.02 s
    return create_block_mask(_mask_mod(padding, limit), batch_size, None, q_length, kv_length, device=device,
                             _compile=compile_it)


def _mask_mod(padding, window):
    """kv <= q (causal), q - kv < window (gpt-oss: the window holds `window` keys, the query's own included),
    and the key is not padding. One code object for every layer type and batch."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & padding[b, kv_idx]

    return mask_mod


def _window_of(mask_function, sliding_window: int | None) -> int | None:
    """None if `mask_function` is transformers' causal mask, `sliding_window` if it is its sliding-window causal mask
    (checked on a [2W+1]^2 index grid on CPU: no device sync); refuses anything else."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is None or mask_function is causal_mask_function:
        return None
    if sliding_window:
        n = 2 * sliding_window + 1
        q_idx, kv_idx = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        try:
            given = torch.as_tensor(mask_function(0, 0, q_idx, kv_idx)).bool()
        except (IndexError, RuntimeError, TypeError):  # a function over captured tensors (packing, overlays)
            given = None
        if given is not None and torch.equal(given, (kv_idx <= q_idx) & (q_idx - kv_idx < sliding_window)):
            return sliding_window
    raise ValueError(f"{NAME} builds causal and sliding-window masks only; this model asked for another (packed "
                     "sequences or a mask overlay): use hardware.attention eager")


def use(model, choice: str, device: torch.device | str, max_length: int | None = None, log=print) -> str:
    """Switch `model` (a transformers model, or a peft model around one) to the attention `choice` resolves to on
    `device` for sequences of up to `max_length` tokens (needed for 'auto' on CUDA); returns 'eager' or 'flex'.
    Checkpoints are always loaded eager (engine/fp4/model_io.py), so a saved model never carries this choice."""
    impl = resolve(choice, device, max_length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if impl == "flex":
        register()
        base.set_attn_implementation(NAME)
        if base.config._attn_implementation != NAME:  # transformers only warns when a class cannot switch
            raise RuntimeError(f"{type(base).__name__} did not switch to {NAME} (it stayed on "
                               f"{base.config._attn_implementation!r}): set hardware.attention to eager")
        where = "compiled flex_attention" if torch.device(device).type == "cuda" else "flex's dense reference (CPU)"
        log(f"attention: {NAME} ({where}; sinks through the LSE, causal / sliding-window / padding BlockMasks)")
    else:
        base.set_attn_implementation("eager")
        if choice == "auto" and torch.device(device).type == "cuda":
            log(f"attention: eager (auto: data.max_length {max_length} < {AUTO_FLEX_MIN_LENGTH}, where flex's "
                "compile costs more than it saves)")
    return impl


def sink_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, s_aux=None, **kwargs):
    """transformers' attention-interface signature: q [B, Hq, T, D], k / v [B, Hkv, S, D], the BlockMask that
    transformers built for this layer (causal, or causal + sliding window; padding), s_aux = the sinks [Hq].
    Returns (output [B, T, Hq, D], None): no attention weights exist to return."""
    from torch.nn.attention.flex_attention import BlockMask

    if dropout:
        raise ValueError(f"{NAME} has no attention dropout (gpt-oss trains with attention_dropout 0.0; got {dropout})")
    if not isinstance(attention_mask, BlockMask):
        raise TypeError(f"{NAME} needs the BlockMask transformers builds for attn_implementation={NAME!r}, got "
                        f"{type(attention_mask).__name__}: pass a 2-D attention_mask (or none), not a prepared mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return sink_attention(query, key, value, s_aux, attention_mask, scale), None


def sink_attention(query, key, value, sinks, block_mask, scale: float):
    """softmax([scores, sink]) @ v without the scores: flex's output gated by sigmoid(lse - sink), in fp32.
    Output [B, T, Hq, D] in the query's dtype (the layout eager returns)."""
    flex = _flex_compiled if query.is_cuda else _flex_dense
    out, lse = flex(query, key, value, block_mask, scale)
    if sinks is not None:
        gate = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))  # [B, Hq, T]; flex's lse is fp32 for bf16
        out = out * gate.unsqueeze(-1)  # bf16 x fp32 -> fp32; autograd keeps `out` (saved by flex anyway) and the gate
    return out.to(query.dtype).transpose(1, 2).contiguous()


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None (the default): the first shape compiles static, a second one recompiles with a dynamic sequence
    # length, so batches padded to varying lengths (TRL pads to the longest example) do not recompile every step.
    return torch.compile(flex_attention)


def _flex_compiled(query, key, value, block_mask, scale):
    """(output, natural-log lse in fp32) from the compiled kernel."""
    # Always the training kernel: for batches shorter than 128 tokens Inductor picks its flex-decoding kernel, which
    # found no valid config for these inputs and failed to compile (H200, torch 2.11, 2026-12-03: a batch of 68).
    options = {"FORCE_USE_FLEX_ATTENTION": True}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the LSE was a flag
        return _compiled()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True,
                           kernel_options=options)
    out, aux = _compiled()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True,
                           return_aux=AuxRequest(lse=True), kernel_options=options)
    return out, aux.lse


def _flex_dense(query, key, value, block_mask, scale):
    """(output, natural-log lse) from flex's dense reference: the higher-order op run eagerly (differentiable on
    CPU, where the public API refuses backward). The op returns the lse in base 2 (the public API's
    `_finalize_outputs` converts it for every backend but FLASH); tests/test_attention.py pins this against the
    public flex_attention's forward. GQA: the op maps each query head to its K/V head, as the kernel does."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op
    from torch.nn.attention.flex_attention import _identity

    out, lse2, _ = flex_op(query, key, value, _identity, block_mask.as_tuple(), scale, {})
    return out, lse2 * math.log(2.0)
