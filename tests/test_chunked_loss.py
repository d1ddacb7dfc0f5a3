"""The loss without [tokens, vocabulary] logits (hardware.chunked_loss), on CPU.

'chunked' is TRL's fused LM head (trl.kernels.ChunkedLogProbFunction), which SFTTrainer and modelopt's
QATSFTTrainer use as their loss; 'full' is transformers' Trainer.compute_loss over the full logits. Both must give
the same loss and gradients on the same assistant-only labels with the same num_items_in_batch normalisation.
Tiles are made small here so the vocabulary (2,048) spans 4 tiles and the tokens several, as 201,088 does on gpt-oss.
"""

from __future__ import annotations

import pytest
import torch

from engine.training import hf_trainer


@pytest.fixture
def small_tiles(monkeypatch):
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 512)  # vocabulary columns per tile
    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 64)  # tokens per tile


def tiny_trainer(tmp_path):
    from transformers import GptOssForCausalLM
    from trl import SFTConfig, SFTTrainer

    from engine.data.chat_data import load_chat_dataset
    from engine.data.embedded_model import VOCAB_SIZE, embedded_tokenizer, tiny_config

    torch.manual_seed(0)
    model = GptOssForCausalLM(tiny_config(VOCAB_SIZE))
    rows = load_chat_dataset("embedded:language")[:3] + load_chat_dataset("embedded:refusal")[:3]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], assistant_only_loss=True, max_length=512,
                     per_device_train_batch_size=6, packing=False, disable_tqdm=True)
    return hf_trainer.atomic_trainer(SFTTrainer)(model=model, args=args, train_dataset=hf_trainer.as_dataset(rows),
                                                 processing_class=embedded_tokenizer())


def loss_and_grads(trainer, batch, num_items):
    trainer.model.zero_grad(set_to_none=True)
    calls = []
    hook = trainer.model.lm_head.register_forward_hook(lambda m, i, out: calls.append(tuple(out.shape)))
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


def test_chunked_loss_equals_the_full_logits_loss_value_and_grads(tmp_path, small_tiles):
    trainer = tiny_trainer(tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    labels = batch["labels"]
    assistant = int((labels[:, 1:] != -100).sum())
    assert 0 < assistant < int(batch["attention_mask"].sum()) - 6  # prompts carry no loss: assistant-only labels
    num_items = torch.tensor(2 * assistant)  # the trainer's normalisation, as if another micro-batch followed
    # Set by the training loop. With more than one accumulation step TRL divides the router aux loss by it and the
    # model's own loss does not (a difference of the 'full' path that predates the option; kept as it is).
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.model.config.output_router_logits  # the router aux loss is part of both losses
    trainer.loss_path = "chunked"
    chunked, grads_c, calls_c = loss_and_grads(trainer, batch, num_items)
    trainer.loss_path = "full"
    full, grads_f, calls_f = loss_and_grads(trainer, batch, num_items)
    assert calls_c == []  # the chunked path never runs lm_head as a module: no [tokens, vocab] logits
    assert calls_f and calls_f[0][-1] == 2048  # the full path does
    assert abs(chunked.item() - full.item()) <= 1e-6 * abs(full.item())
    assert grads_c.keys() == grads_f.keys() and "lm_head.weight" in grads_c
    for name, g in grads_f.items():
        assert (grads_c[name] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), 1e-6), name


def test_loss_path_choices():
    assert hf_trainer.loss_path("auto", "single") == "chunked"  # what SFT / QAT ran before the option existed
    assert hf_trainer.loss_path("auto", "ddp") == "chunked"
    assert hf_trainer.loss_path("auto", "fsdp2") == "full"
    assert hf_trainer.loss_path("off", "single") == "full"
    assert hf_trainer.loss_path("on", "ddp") == "chunked"
    with pytest.raises(ValueError, match="chunked_loss"):
        hf_trainer.loss_path("yes", "single")


def test_recipe_refuses_chunked_loss_on_under_fsdp2():
    from pydantic import ValidationError

    from engine.recipe.configs import HardwareConfig

    with pytest.raises(ValidationError, match="chunked_loss 'on' cannot run under fsdp2"):
        HardwareConfig(strategy="fsdp2", num_processes=2, chunked_loss="on")
    assert HardwareConfig().attention == "auto" and HardwareConfig().chunked_loss == "auto"
