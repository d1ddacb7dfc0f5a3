"""GPU: the evaluation's 'auto' batch on CUDA takes all the demo's prompts at once and gives the answers batch 64
gives (float32 here, so that no bf16 rounding differs between GEMM shapes; the demo's bf16 pass rates are compared
by bench/engine_overhead.py's run against the earlier results).
Run on the device: python -m pytest -m gpu tests/test_eval_batching_gpu.py
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GptOssForCausalLM  # noqa: E402

from engine.data import embedded_model  # noqa: E402
from engine.data.chat_data import load_chat_dataset  # noqa: E402
from engine.evaluation import evaluator  # noqa: E402
from engine.stages.evaluate import pick_examples  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def test_auto_batch_takes_every_demo_prompt_and_answers_as_batch_64_does():
    torch.manual_seed(0)
    tokenizer = embedded_model.embedded_tokenizer()
    model = GptOssForCausalLM(embedded_model.tiny_config(len(tokenizer))).float().cuda().eval()
    rows = pick_examples(load_chat_dataset("embedded:demo"), 150)
    assert evaluator.auto_batch_size(model, 400, 1200, cpu_default=64) == 1200
    seen = []
    by_batch = {bs: evaluator.generate_and_judge(model, tokenizer, rows, 24, bs, on_batch=lambda d, t: seen.append(d))
                for bs in (64, "auto")}
    assert seen[-1] == len(rows) and seen.count(len(rows)) == 2 and len(seen) == 5 + 1  # 5 batches of <=64, then 1
    same = sum(a["completion"]["raw"] == b["completion"]["raw"] for a, b in zip(by_batch[64], by_batch["auto"]))
    assert same >= 0.98 * len(rows), f"only {same}/{len(rows)} answers identical"
    loss = {bs: evaluator.eval_loss(model, tokenizer, rows, 256, batch_size=bs) for bs in (32, "auto")}
    assert loss["auto"] == pytest.approx(loss[32], rel=1e-4)
