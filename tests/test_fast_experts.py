"""The fast experts path (engine/fp4/fast_experts.py) computes what modelopt's gpt-oss wrapper computes.

CPU here (the GPU file test_fp4_triton_gpu.py repeats the comparison with the Triton kernel on an H100).
"""

import copy

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from engine.fp4 import fast_experts, modelopt_glue


def tiny(dtype=torch.float32):
    cfg = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return GptOssForCausalLM(cfg).to(dtype)


def quantized(fmt):
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return modelopt_glue.quantize(tiny(), fmt, lambda m: m(input_ids=batch), modelopt_glue.resolve_backend("torch", "cpu"))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fast_path_matches_modelopt_wrapper(fmt):
    slow = quantized(fmt)
    fast = copy.deepcopy(slow)
    assert fast_experts.enable(fast) == 2
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    out_slow, out_fast = slow(input_ids=tokens, labels=tokens), fast(input_ids=tokens, labels=tokens)
    assert torch.equal(out_fast.logits, out_slow.logits)  # same fake-quantized weights, same forward math
    # Backward sums the per-expert weight gradients in another order (one grouped op vs a loop): fp32 rounding only.
    out_slow.loss.backward()
    out_fast.loss.backward()
    for (name, p), (_, q) in zip(slow.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_path_uses_exactly_the_exported_weights_with_straight_through_grads():
    model = quantized("mxfp4")
    fast_experts.enable(model)
    effective = modelopt_glue.effective_expert_weights(model)  # what evaluation and export read
    twin = copy.deepcopy(model)
    fast_experts.disable(twin)
    for item in modelopt_glue.expert_weights(twin):  # the twin computes with the fake-quantized weights, unquantized
        item.weight.data.copy_(effective[item.name])
        item.quantizer.disable()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    model(input_ids=tokens, labels=tokens).loss.backward()
    twin_out = twin(input_ids=tokens, labels=tokens)
    twin_out.loss.backward()
    for a, b in zip(modelopt_glue.expert_weights(model), modelopt_glue.expert_weights(twin)):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-7)  # dL/dW = dL/dW_q


def test_w4a4_stays_on_modelopt_path():
    model = modelopt_glue.quantize(tiny(), "nvfp4_w4a4", lambda m: m(input_ids=torch.zeros(1, 8, dtype=torch.long)),
                           modelopt_glue.resolve_backend("torch", "cpu"))
    assert fast_experts.enable(model) == 0


def test_fake_quantized_weights_are_remade_for_backward_not_kept(monkeypatch):
    """Forward quantizes each expert weight once; backward remakes it instead of keeping a copy alive."""
    model = quantized("mxfp4")
    fast_experts.enable(model)
    calls = []
    original = fast_experts.fake_quant_input_dim
    monkeypatch.setattr(fast_experts, "fake_quant_input_dim", lambda *a: calls.append(1) or original(*a))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=tokens, labels=tokens).loss
    assert len(calls) == 4  # 2 layers x (gate_up, down)
    loss.backward()
    assert len(calls) == 8  # remade once each for the matmuls' backward
    with torch.no_grad():
        model(input_ids=tokens)
    assert len(calls) == 12  # no hooks without grad


def alive_activation_bytes_after_forward(model, tokens) -> tuple[int, torch.Tensor]:
    """(bytes of the tensors made during the forward that are still alive when it returns, parameters left out:
    what autograd keeps for backward; the loss). Storages are tracked with weak references."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    made = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    made[t.untyped_storage().data_ptr()] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
            return out

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with Record():
        loss = model(input_ids=tokens, labels=tokens).loss
    import gc

    gc.collect()
    return sum(n for ptr, (ref, n) in made.items() if not ref.expired() and ptr not in params), loss


def test_gradient_checkpointing_drops_the_experts_activations_and_keeps_the_gradients():
    """Under checkpointing the fast path's saved-tensor hooks hand the experts' activations to the checkpoint's hooks
    (autograd applies only the innermost pair): before, they stayed alive from forward to backward in every layer,
    which at the 20b's shape is ~4 MiB per token (docs/benchmarks.md, max-context)."""
    model = quantized("mxfp4")
    fast_experts.enable(model)
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = copy.deepcopy(model)
    fast_experts.disable(wrapper)  # modelopt's own experts wrapper, checkpointed: saves nothing of its own
    for m in (model, plain, wrapper):
        m.train()
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(4))
    kept, loss = alive_activation_bytes_after_forward(model, tokens)
    kept_wrapper, _ = alive_activation_bytes_after_forward(wrapper, tokens)
    kept_plain, _ = alive_activation_bytes_after_forward(plain, tokens)
    assert kept_plain > 5 * kept_wrapper  # the measure sees activations: without checkpointing they are all kept
    assert kept <= 1.05 * kept_wrapper, (kept, kept_wrapper)
    loss.backward()  # recomputes each layer, the fast experts included, under the checkpoint's hooks
    plain(input_ids=tokens, labels=tokens).loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
