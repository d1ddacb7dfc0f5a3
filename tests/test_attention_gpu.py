"""GPU: flex attention (compiled) and the chunked loss against eager, at gpt-oss-20b's attention shape.

- forward and backward of a 2-layer gpt-oss (64 query / 8 KV heads, head_dim 64, a 128-token sliding layer and a
  full layer, right and left padding) in bf16 at T = 1024 and 4096: flex's error against an fp32 eager reference is
  no larger than bf16 eager's (plus a small margin), for the logits and the gradients of the sinks, q/k/v/o and the
  embeddings;
- 50 SFT steps through the engine's trainer (TRL SFTTrainer, assistant-only labels) with flex + chunked loss against
  eager + full logits, same data and seed, and 50 QAT steps (MXFP4 on our backend and fast experts path, the QAT
  stage's trainer class): the loss curves agree within bf16 training noise.
Run on the device: python -m pytest -m gpu tests/test_attention_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.training import attention, hf_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def gpt_oss_attention_shape(seq: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=1024, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                       num_local_experts=4, num_experts_per_tok=2, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=64, sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=max(4096, seq))
    cfg._attn_implementation = "eager"
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
    return ((a - b).norm() / b.norm()).item()


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
    assert torch.isfinite(f_logits).all()
    e_err, f_err = rel_err(e_logits[kept], ref_logits[kept]), rel_err(f_logits[kept], ref_logits[kept])
    print(f"T={seq} logits rel err: eager bf16 {e_err:.2e}, flex bf16 {f_err:.2e}")
    assert f_err <= 1.5 * e_err + 2e-3
    for name, g in ref_grads.items():
        e_err, f_err = rel_err(e_grads[name], g), rel_err(f_grads[name], g)
        print(f"T={seq} {name}: eager {e_err:.2e}, flex {f_err:.2e}")
        assert torch.isfinite(f_grads[name]).all(), name
        assert f_err <= 1.5 * e_err + 5e-3, name


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
def test_50_steps_flex_and_chunked_follow_eager_and_full_logits(tmp_path, qat):
    eager = sft_losses(tmp_path, "eager", "full", qat=qat)
    new = sft_losses(tmp_path, "flex", "chunked", qat=qat)
    assert len(eager) == len(new) == 50
    print("eager+full   ", [round(x, 3) for x in eager[::5]])
    print("flex+chunked ", [round(x, 3) for x in new[::5]])
    assert eager[-1] < 0.5 * eager[0]  # it trained
    diffs = [abs(a - b) / a for a, b in zip(eager, new)]
    assert sum(diffs[:10]) / 10 < 0.02  # the first steps: same model, same data, only the kernels differ
    assert sum(diffs) / len(diffs) < 0.05 and diffs[-1] < 0.1
