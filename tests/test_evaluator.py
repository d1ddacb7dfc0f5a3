"""engine/evaluation/evaluator.py's eval loss: the number the full logits give, without holding them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GptOssForCausalLM  # noqa: E402

from engine.data import embedded_model  # noqa: E402
from engine.data.chat_data import load_chat_dataset  # noqa: E402
from engine.evaluation import evaluator  # noqa: E402


def full_logits_loss(model, tokenizer, rows, max_length, batch_size=32):
    """The straightforward computation: the whole batch's float32 logits at once."""
    pairs = sorted((evaluator.tokenize_chat(tokenizer, r["messages"], max_length) for r in rows), key=lambda p: len(p[0]))
    total, count, pad = 0.0, 0, tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(i) for i, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                   labels[:, 1:].reshape(-1), ignore_index=-100,
                                                   reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("wrapped", [False, True])
def test_eval_loss_is_the_full_logits_loss_row_by_row(wrapped):
    """Row by row through the lm_head (a batch's float32 logits ran gpt-oss-20b out of memory), on a plain model and
    on a LoRA-wrapped one (what a chained evaluation of a LoRA SFT receives)."""
    torch.manual_seed(0)
    tokenizer = embedded_model.embedded_tokenizer()
    model = GptOssForCausalLM(embedded_model.tiny_config(len(tokenizer))).float().eval()
    if wrapped:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = load_chat_dataset("embedded:demo")[:70]
    got = evaluator.eval_loss(model, tokenizer, rows, max_length=256)
    assert got == pytest.approx(full_logits_loss(model, tokenizer, rows, 256), rel=1e-6)
    assert 0 < got < 20


def test_eval_loss_never_holds_a_whole_batch_of_logits():
    """The largest vocabulary-wide tensor created is one row's: [tokens, vocab], not [batch, tokens, vocab]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestVocabTensor(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab:
                    self.rows = max(self.rows, t.numel() // (vocab * max_length))
            return out

    torch.manual_seed(0)
    tokenizer = embedded_model.embedded_tokenizer()
    vocab, max_length = len(tokenizer), 256
    model = GptOssForCausalLM(embedded_model.tiny_config(vocab)).float().eval()
    rows = load_chat_dataset("embedded:demo")[:40]
    with LargestVocabTensor() as seen:
        evaluator.eval_loss(model, tokenizer, rows, max_length=max_length, batch_size=32)
    assert seen.rows <= 1, f"a tensor of {seen.rows} rows x {max_length} tokens x the vocabulary was created"
