"""gpt-oss attention through flex_attention (engine/training/attention.py) against eager, on CPU.

On CPU, torch 2.13's public flex_attention refuses backward ("does not support backward on CPU"), and compiled it
runs inference only without the LSE; engine/training/attention.py therefore runs flex's dense reference op there.
These tests check the sink math, the masks (causal, sliding window of N keys, padding, GQA) and every gradient
against eager. The same code on CUDA, compiled, is checked by tests/test_attention_gpu.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.training import attention


def reference(q, k, v, sinks, keep, scale):
    """softmax over [scores, sink] in float64, K/V heads repeated (eager's math, without its bf16 rounding)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)
    sink = sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    return (probs @ v).transpose(1, 2)


def test_sink_attention_matches_softmax_with_sink_values_and_grads():
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(0)
    B, Hq, Hkv, T, D, window = 2, 4, 2, 40, 16, 8
    q, k, v = (torch.randn(B, h, T, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :7] = False  # left padding: queries 0..6 of row 1 see no key at all

    def mask(b, h, qi, ki):
        return (ki <= qi) & (ki > qi - window) & valid[b, ki]

    block_mask = create_block_mask(mask, B, None, T, T, device="cpu")
    pos = torch.arange(T)
    keep = ((pos.view(1, -1) <= pos.view(-1, 1)) & (pos.view(1, -1) > pos.view(-1, 1) - window)).view(1, 1, T, T)
    keep = keep & valid.view(B, 1, 1, T)
    scale = D ** -0.5
    ours = attention.sink_attention(q, k, v, sinks, block_mask, scale)
    ref = reference(q, k, v, sinks, keep, scale)
    assert ours.shape == (B, T, Hq, D)
    assert (ours - ref).abs().max().item() < 1e-12
    assert ours[1, :7].abs().max().item() == 0.0  # fully masked queries: only the sink, output 0 as in eager
    g = torch.randn_like(ref)
    got = torch.autograd.grad((ours * g).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, sinks))
    for name, a, b in zip("q k v sinks".split(), got, want):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max().item() < 1e-12, name
        assert b.abs().max().item() > 1e-3, name  # the gradient is not trivially zero


def test_dense_op_lse_is_the_public_apis_natural_log_lse():
    """The dense op returns the lse in base 2; the public flex_attention (forward only on CPU) converts it."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, h, 32, 16) for h in (4, 2, 2))
    block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, None, 32, 32, device="cpu")
    out, lse = attention._flex_dense(q, k, v, block_mask, 0.25)
    out_api, aux = flex_attention(q, k, v, block_mask=block_mask, scale=0.25, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True))
    assert torch.allclose(out, out_api, atol=1e-6)
    assert torch.allclose(lse, aux.lse, atol=1e-5)


def tiny_gpt_oss(window: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                       num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)  # sinks that matter (init gives ~0.02)
    return model


def test_model_with_flex_matches_eager_forward_and_every_gradient():
    """Whole gpt-oss (a sliding layer with a 5-key window, a full layer), right and left padding, fp32."""
    eager = tiny_gpt_oss(window=5)
    flex = copy.deepcopy(eager)
    assert attention.use(flex, "flex", "cpu", log=lambda _: None) == "flex"
    assert flex.config._attn_implementation == attention.NAME
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (3, 23))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    out_e = eager(input_ids=ids, attention_mask=mask, labels=labels)
    out_f = flex(input_ids=ids, attention_mask=mask, labels=labels)
    out_e.loss.backward()
    out_f.loss.backward()
    kept = mask.bool()
    assert (out_e.logits - out_f.logits)[kept].abs().max().item() < 1e-5
    assert abs(out_e.loss.item() - out_f.loss.item()) < 1e-6
    grads_e, grads_f = dict(eager.named_parameters()), dict(flex.named_parameters())
    for name, p in grads_e.items():
        assert p.grad is not None, name
        scale = p.grad.abs().max().item()
        assert (p.grad - grads_f[name].grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name
    assert grads_e["model.layers.0.self_attn.sinks"].grad.abs().max() > 1e-4  # the sink gradient is exercised


def test_a_window_of_n_plus_one_keys_would_be_caught():
    """The check above is sharp enough: flex with flex's example window (N + 1 keys) differs from eager's N."""
    eager = tiny_gpt_oss(window=5)
    wider = tiny_gpt_oss(window=6)
    attention.use(wider, "flex", "cpu", log=lambda _: None)
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (eager(input_ids=ids).logits - wider(input_ids=ids).logits).abs().max().item()
    assert diff > 1e-3


def test_auto_is_flex_on_cuda_from_max_length_1024_and_eager_on_cpu():
    """The rule (engine/training/attention.py, AUTO_FLEX_MIN_LENGTH): flex on CUDA for recipes of 1024 tokens or
    more (the 20b recipe), eager below (the demo's 256: the compile would cost more than it saves) and on CPU."""
    assert attention.AUTO_FLEX_MIN_LENGTH == 1024
    for max_length in (256, 1023, 1024, 4096, 131072):
        assert attention.resolve("auto", "cpu", max_length) == "eager"
        assert attention.resolve("auto", torch.device("cpu"), max_length) == "eager"
        assert attention.resolve("eager", "cuda", max_length) == "eager"
        assert attention.resolve("flex", "cuda", max_length) == "flex"
        assert attention.resolve("flex", "cpu", max_length) == "flex"
    assert attention.resolve("auto", "cuda:0", 256) == "eager"
    assert attention.resolve("auto", "cuda", 1023) == "eager"
    assert attention.resolve("auto", "cuda", 1024) == "flex"
    assert attention.resolve("auto", torch.device("cuda", 1), 65536) == "flex"
    assert attention.resolve("auto", "cpu", None) == "eager"
    with pytest.raises(ValueError, match="data.max_length"):
        attention.resolve("auto", "cuda", None)  # the rule cannot be applied without the length
    model = tiny_gpt_oss(window=5)
    assert attention.use(model, "auto", "cpu", 4096, log=lambda _: None) == "eager"
    assert model.config._attn_implementation == "eager"
    logged = []  # `use` switches the config only, so the CUDA rule is checkable on a model that sits on the CPU
    assert attention.use(model, "auto", "cuda", 4096, log=logged.append) == "flex"
    assert model.config._attn_implementation == attention.NAME
    assert attention.use(model, "auto", "cuda", 256, log=logged.append) == "eager"
    assert model.config._attn_implementation == "eager"
    assert "compiled flex_attention" in logged[0] and "data.max_length 256 < 1024" in logged[1]


def test_resolve_and_use_back_to_eager():
    assert attention.resolve("auto", "cpu", 256) == "eager"
    assert attention.resolve("flex", "cpu", 256) == "flex"
    with pytest.raises(ValueError, match="hardware.attention"):
        attention.resolve("sdpa", "cpu", 256)
    model = tiny_gpt_oss(window=5)
    attention.use(model, "flex", "cpu", log=lambda _: None)
    assert attention.use(model, "auto", "cpu") == "eager"
    assert model.config._attn_implementation == "eager"


def test_use_fails_loudly_when_transformers_keeps_the_model_on_eager(monkeypatch):
    """transformers only logs a warning when a class cannot switch its attention (its modelling file does not go
    through the AttentionInterface): training would then run eager while the log says flex."""
    from transformers import GptOssForCausalLM

    model = tiny_gpt_oss(window=5)
    monkeypatch.setattr(GptOssForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(RuntimeError, match="hardware.attention to eager"):
        attention.use(model, "flex", "cpu", log=lambda _: None)
    assert model.config._attn_implementation == "eager"


def padded_batches(lengths, vocab: int = 97, seed: int = 4):
    """Batches of 2 rows padded to varying lengths (as TRL pads to the longest example), alternately with and
    without right padding."""
    gen = torch.Generator().manual_seed(seed)
    for i, length in enumerate(lengths):
        ids = torch.randint(0, vocab, (2, length), generator=gen)
        mask = torch.ones(2, length, dtype=torch.long)
        if i % 2 == 0:
            mask[1, length - 5:] = 0
        yield ids, mask


def test_compiled_flex_stays_compiled_across_layer_types_padding_and_lengths(monkeypatch):
    """Batches of 7 lengths (140..300), padded or not, through a sliding and a full layer: compiled flex_attention
    traces 3 graphs (the first shape static; then the length dynamic; then the block count too) and stays far from
    torch's recompile limit (8), past which it would run uncompiled and materialise the scores. With transformers'
    own flex masks (a mask_mod whose code differs per layer type and padding) the same batches hit the limit.
    Dynamo's guards are the same whatever the backend, so a counting backend finds them on CPU in seconds; the
    CUDA code path (`_flex_compiled`) is what runs."""
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    graphs = CompileCounter()  # a backend that counts the graphs it is given and runs them as they are
    compiled = torch.compile(flex_attention, backend=graphs)
    monkeypatch.setattr(attention, "_compiled", lambda: compiled)
    monkeypatch.setattr(attention, "_flex_dense", attention._flex_compiled)
    model = tiny_gpt_oss(window=8)
    attention.use(model, "flex", "cpu", log=lambda _: None)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for ids, mask in padded_batches((140, 140, 170, 200, 230, 260, 300)):
                model(input_ids=ids, attention_mask=mask)
        assert graphs.frame_count == 3
    finally:
        torch._dynamo.reset()


def test_masks_other_than_causal_and_sliding_are_refused():
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_causal_mask_function

    assert attention._window_of(causal_mask_function, 128) is None
    assert attention._window_of(sliding_window_causal_mask_function(128), 128) == 128
    documents = torch.tensor([[0] * 10 + [1] * 290])  # packed sequences: a mask over captured tensors
    packed = and_masks(causal_mask_function, lambda b, h, q, kv: documents[b, q] == documents[b, kv])
    with pytest.raises(ValueError, match="hardware.attention eager"):
        attention._window_of(packed, 128)
    with pytest.raises(ValueError, match="hardware.attention eager"):
        attention._window_of(sliding_window_causal_mask_function(129), 128)  # 129 keys: flex's example, not gpt-oss
    model = tiny_gpt_oss(window=5)
    attention.use(model, "flex", "cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="no KV cache"):  # generation with a cache is not what this kernel is for
        model.generate(torch.randint(0, 97, (1, 8)), max_new_tokens=2, do_sample=False)


def test_quantized_model_with_fast_experts_runs_our_kernel_in_both_layers(monkeypatch):
    """The QAT model (modelopt quantizers, our fast experts path; modelopt wraps the attention modules and swaps the
    attention function per forward) with flex attention: our kernel runs in both layers, and the loss and every
    gradient are eager's."""
    from engine.fp4 import fast_experts, modelopt_glue

    ids = torch.randint(0, 97, (3, 23), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    eager = modelopt_glue.quantize(tiny_gpt_oss(window=5), "mxfp4", lambda m: m(input_ids=ids, attention_mask=mask),
                                   modelopt_glue.resolve_backend("torch", "cpu"))
    assert fast_experts.enable(eager) == 2
    flex = copy.deepcopy(eager)
    assert attention.use(flex, "flex", "cpu", log=lambda _: None) == "flex"
    calls = []
    original = attention.sink_attention
    monkeypatch.setattr(attention, "sink_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    losses = {}
    for name, model in (("eager", eager), ("flex", flex)):
        losses[name] = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses[name].backward()
    assert len(calls) == 2  # one per layer (sliding, full), and none for eager
    torch.testing.assert_close(losses["flex"], losses["eager"], rtol=1e-6, atol=1e-6)
    for (name, p), (_, q) in zip(eager.named_parameters(), flex.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
