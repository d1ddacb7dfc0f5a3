"""GPU: flex attention (compiled) and the chunked loss against eager, at gpt-oss-20b's attention shape.

- no recompiles: batches padded to ten lengths (300..2048, with and without padding) through a sliding and a full
  layer, forward + backward, with torch's recompile limit made an error (past it compiled flex would silently run
  uncompiled, materialising the scores): the compiled graphs stop growing after the first lengths;
- the kernel alone, per layer type (a 128-token sliding window, full causal), T = 1024 and 4096, right and left
  padding, 64 query / 8 KV heads of 64: output and the gradients of q, k, v and the sinks in bf16, against eager in
  fp32, within twice bf16 eager's own error (plus a small floor);
- forward and backward of a 2-layer gpt-oss (both layer types, padding) in bf16 at T = 1024 and 4096: flex's error
  against an fp32 eager reference is no larger than bf16 eager's (plus a small margin), for the logits and the
  gradients of the sinks, q/k/v/o and the embeddings;
- 50 SFT steps through the engine's trainer (TRL SFTTrainer, assistant-only labels) with flex + chunked loss against
  eager + full logits, same data and seed, and 50 QAT steps (MXFP4 on our backend and fast experts path, the QAT
  stage's trainer class): the loss curves agree within bf16 training noise, and our kernel ran in every step.
With $OUT set, each test writes what it measured to $OUT/attention-gpu-<test>.json (before asserting).
Run on the device: python -m pytest -s -m gpu tests/test_attention_gpu.py (bench/device.sh attention-tests)
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.training import attention, hf_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


@pytest.fixture(autouse=True)
def recompile_limit_is_an_error():
    """Past torch's recompile limit, compiled flex_attention would fall back to running uncompiled (correct, but with
    the full score matrix): every test here fails instead."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def record(name: str, data: dict) -> None:
    """What a test measured, to $OUT/attention-gpu-<name>.json when $OUT is set (the device run brings it back)."""
    if os.environ.get("OUT"):
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        path = Path(os.environ["OUT"]) / f"attention-gpu-{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, **data}, indent=1))


def attention_shape_config(seq: int):
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=1024, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                       num_local_experts=4, num_experts_per_tok=2, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=64, sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=max(4096, seq))
    cfg._attn_implementation = "eager"
    return cfg


def gpt_oss_attention_shape(seq: int):
    from transformers import GptOssForCausalLM

    cfg = attention_shape_config(seq)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GptOssForCausalLM(cfg)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, 0.0, 1.0)  # sinks that matter
    return model


def run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    watched = {n: p.grad.float() for n, p in model.named_parameters()
               if any(k in n for k in ("sinks", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "embed_tokens"))}
    return out.logits.float(), watched


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def padded_batches(lengths, batch: int = 2, vocab: int = 1024):
    """Batches padded to each of `lengths` (TRL pads to the longest example), alternately with right + left padding
    and without any: transformers' own flex masks differ between the two, ours do not."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    for i, length in enumerate(lengths):
        ids = torch.randint(0, vocab, (batch, length), device="cuda", generator=gen)
        mask = torch.ones_like(ids)
        if i % 2 == 0:
            mask[0, length - length // 3:] = 0  # right padding
            mask[1, : length // 5] = 0  # left padding
        yield ids, mask, ids.masked_fill(mask == 0, -100)


WARM_UP = (300, 300, 517, 640, 901)  # static shapes, then dynamic ones; lengths off and on the 128-token blocks
LATER = (1024, 1200, 1536, 1777, 2048)


def test_no_recompiles_across_lengths_padding_and_layer_types(monkeypatch):
    """Forward + backward of a sliding and a full layer over ten padded lengths: after the warm-up lengths, new
    lengths compile nothing (dynamo's graph count stays put), and the recompile limit is never reached (the fixture
    makes that an error). On CPU a counting backend found 8 graphs (the limit) with transformers' masks over 7
    batches, 3 with ours (tests/test_attention.py); this is the same on the real compiler, with the backward and
    the compiled create_block_mask."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # count from an empty cache
    model = gpt_oss_attention_shape(max(LATER)).to(torch.bfloat16)
    attention.use(model, "flex", "cuda", log=lambda _: None)
    start, graphs, calls = counters["stats"]["unique_graphs"], [], []
    original = attention.sink_attention
    monkeypatch.setattr(attention, "sink_attention", lambda *a: calls.append(1) or original(*a))
    for ids, mask, labels in padded_batches(WARM_UP + LATER):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"] - start)
    record("recompiles", {"lengths": WARM_UP + LATER, "graphs_after_each_batch": graphs,
                          "kernel_calls": len(calls)})
    print("compiled graphs after each batch:", dict(zip(WARM_UP + LATER, graphs)))
    assert len(calls) == 2 * len(graphs)  # our kernel, in both layers, every batch
    assert graphs[len(WARM_UP) - 1] == graphs[-1], "new lengths after the warm-up recompiled"


def layer_mask(cfg, impl: str, mask2d: torch.Tensor, dtype, layer_type: str):
    """The mask transformers builds for one layer type with attn_implementation `impl` (ours: a BlockMask)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = impl
    embeds = torch.zeros(*mask2d.shape, 1, device="cuda", dtype=dtype)
    build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
    return build(config=cfg, inputs_embeds=embeds, attention_mask=mask2d, cache=None)


# 68: a batch shorter than 128 tokens, where Inductor's flex-decoding kernel failed to compile (H200, 2026-12-03)
@pytest.mark.parametrize("length", [68, 1024, 4096])
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_kernel_forward_and_input_and_sink_gradients_within_bf16_error_of_eager(length, layer_type):
    """sink_flex_attention alone against transformers' eager_attention_forward, on the masks transformers builds
    for the layer type (with right and left padding: fully masked query rows), 64 / 8 heads of 64, sinks of a
    trained model's size."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    attention.register()
    cfg, batch = attention_shape_config(length), 2
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(batch, 64, length, 64, device="cuda", generator=gen)
    k, v = (torch.randn(batch, 8, length, 64, device="cuda", generator=gen) for _ in range(2))
    sinks = torch.randn(64, device="cuda", generator=gen) * 2
    grad_out = torch.randn(batch, length, 64, 64, device="cuda", generator=gen)
    mask2d = next(padded_batches([length], batch))[1]
    results = {}
    for name, dtype, impl in (("ref", torch.float32, "eager"), ("eager", torch.bfloat16, "eager"),
                              ("flex", torch.bfloat16, attention.NAME)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, sinks)]
        module = SimpleNamespace(num_key_value_groups=8, sinks=leaves[3], training=True)
        fn = attention.sink_flex_attention if impl == attention.NAME else eager_attention_forward
        out, _ = fn(module, *leaves[:3], layer_mask(cfg, impl, mask2d, dtype, layer_type), scaling=0.125,
                    s_aux=leaves[3])
        out.backward(grad_out.to(dtype))
        results[name] = [out.detach()] + [t.grad for t in leaves]
        del out, leaves, module
        torch.cuda.empty_cache()
    assert all(torch.isfinite(t).all() for t in results["flex"])
    errors = {}
    for i, what in enumerate(("output", "dq", "dk", "dv", "dsinks")):
        errors[what] = {"flex_bf16": rel_err(results["flex"][i], results["ref"][i]),
                        "eager_bf16": rel_err(results["eager"][i], results["ref"][i])}
    record(f"kernel-{layer_type}-{length}", {"relative_error_vs_fp32_eager": errors})
    for what, e in errors.items():
        print(f"T={length} {layer_type} {what}: flex bf16 {e['flex_bf16']:.2e}, eager bf16 {e['eager_bf16']:.2e}")
        assert e["flex_bf16"] <= 2 * e["eager_bf16"] + 2e-3, what


@pytest.mark.parametrize("seq", [1024, 4096])
def test_flex_matches_eager_at_gpt_oss_20b_attention_shape_bf16(seq):
    reference = gpt_oss_attention_shape(seq)  # fp32 eager
    eager = copy.deepcopy(reference).to(torch.bfloat16)
    flex = copy.deepcopy(eager)
    attention.use(flex, "flex", "cuda", log=lambda _: None)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 1024, (2, seq), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq - seq // 3:] = 0  # right padding
    mask[1, :seq // 5] = 0  # left padding (its first queries see no key at all)
    labels = ids.masked_fill(mask == 0, -100)
    kept = mask.bool()
    ref_logits, ref_grads = run(reference, ids, mask, labels)
    e_logits, e_grads = run(eager, ids, mask, labels)
    f_logits, f_grads = run(flex, ids, mask, labels)
    assert torch.isfinite(f_logits).all() and all(torch.isfinite(g).all() for g in f_grads.values())
    errors = {"logits": (rel_err(e_logits[kept], ref_logits[kept]), rel_err(f_logits[kept], ref_logits[kept]))}
    errors.update({name: (rel_err(e_grads[name], g), rel_err(f_grads[name], g)) for name, g in ref_grads.items()})
    record(f"model-{seq}", {"relative_error_vs_fp32_eager": {k: {"eager_bf16": e, "flex_bf16": f}
                                                             for k, (e, f) in errors.items()}})
    for name, (e_err, f_err) in errors.items():
        print(f"T={seq} {name}: eager bf16 {e_err:.2e}, flex bf16 {f_err:.2e}")
        assert f_err <= 2 * e_err + (2e-3 if name == "logits" else 5e-3), name


def quantize_mxfp4(model, tokenizer, rows):
    """The PTQ stage's model in miniature: MXFP4 fake quant on our backend, calibrated, on the fast experts path."""
    from engine.fp4 import fast_experts, modelopt_glue, torch_backend

    torch_backend.register()
    ids = tokenizer.apply_chat_template(rows[0]["messages"], return_tensors="pt", return_dict=True)["input_ids"]
    model = modelopt_glue.quantize(model, "mxfp4", lambda m: m(input_ids=ids.to("cuda")),
                                   modelopt_glue.resolve_backend("auto", "cuda"))
    assert fast_experts.enable(model) > 0
    return model


def sft_losses(tmp_path, attn: str, loss: str, steps: int = 50, qat: bool = False) -> list[float]:
    """The loss of each of `steps` optimizer steps of the engine's trainer (SFT, or QAT on an MXFP4 model)."""
    from transformers import GptOssForCausalLM
    from trl import SFTConfig, SFTTrainer

    from engine.data.chat_data import load_chat_dataset
    from engine.data.embedded_model import VOCAB_SIZE, embedded_tokenizer, tiny_config

    config = tiny_config(VOCAB_SIZE)
    config.sliding_window = 32  # demo rows are ~100-200 tokens: let the window cut
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to("cuda", torch.bfloat16)
    rows = load_chat_dataset("embedded:demo")[:steps * 8]
    trainer_class = SFTTrainer
    if qat:
        from engine.stages.qat import trainer_class as qat_trainer_class

        model = quantize_mxfp4(model, embedded_tokenizer(), rows)
        trainer_class = qat_trainer_class()
    attention.use(model, attn, "cuda", log=print)
    args = SFTConfig(output_dir=str(tmp_path / f"{attn}-{loss}"), bf16=True, report_to=[], assistant_only_loss=True,
                     max_length=512, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                     packing=False, disable_tqdm=True, dataloader_num_workers=0)
    extra = {"quant_args": None} if qat else {}
    trainer = hf_trainer.atomic_trainer(trainer_class)(model=model, args=args, processing_class=embedded_tokenizer(),
                                                       train_dataset=hf_trainer.as_dataset(rows), **extra)
    trainer.loss_path = loss
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("qat", [False, True], ids=["sft", "qat-mxfp4"])
def test_50_steps_flex_and_chunked_follow_eager_and_full_logits(tmp_path, qat, monkeypatch):
    torch._dynamo.reset()  # another model shape than the tests above: its own compiles, far from the limit
    eager = sft_losses(tmp_path, "eager", "full", qat=qat)
    calls = []
    original = attention.sink_attention
    monkeypatch.setattr(attention, "sink_attention", lambda *a: calls.append(1) or original(*a))
    new = sft_losses(tmp_path, "flex", "chunked", qat=qat)
    name = "qat-mxfp4" if qat else "sft"
    record(f"curve-{name}", {"steps": len(new), "kernel_calls": len(calls), "eager+full": eager, "flex+chunked": new})
    assert len(eager) == len(new) == 50
    print("eager+full   ", [round(x, 3) for x in eager[::5]])
    print("flex+chunked ", [round(x, 3) for x in new[::5]])
    assert len(calls) >= 2 * 50  # our kernel, in both layers, every step (more with checkpointing's recompute)
    assert eager[-1] < 0.5 * eager[0]  # it trained
    diffs = [abs(a - b) / a for a, b in zip(eager, new)]
    assert sum(diffs[:10]) / 10 < 0.02  # the first steps: same model, same data, only the kernels differ
    assert sum(diffs) / len(diffs) < 0.05 and diffs[-1] < 0.1
