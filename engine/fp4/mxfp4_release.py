"""The embedded base released the way gpt-oss is: MXFP4 experts, on the grid, stored in OpenAI's layout.

gpt-oss ships its expert weights in MXFP4; every fine-tune of it starts from weights that sit exactly on the FP4
grid. A BF16 fine-tune at a small learning rate moves most of them by less than half a grid step, and PTQ rounds them
back to where they came from (engine/evaluation/survival.py measures this). A base pre-trained in BF16 and never put
on a grid cannot show that. So, after the BF16 pre-training (engine/data/embedded_model.py), a short QAT phase
makes the model good *at MXFP4* (modelopt's MXFP4 weight-only config with our CPU-capable fake quant, the same the
QAT stage uses), and our exporter writes it in OpenAI's layout. The pipeline then loads it like the real model,
`Mxfp4Config(dequantize=True)` (engine/fp4/model_io.load_model), so SFT starts from on-grid expert weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.data import demo_tasks, embedded_model
from engine.fp4 import export_mxfp4, modelopt_glue

# The release phase's recipe; part of the cache key, so changing it re-releases (the BF16 base stays cached).
# Its length is a sixth of the pre-training's (100 steps after the default 600), so a test's short base releases fast.
RELEASE = {"fraction": 1 / 6, "lr": 3e-4, "seed_offset": 1, "version": 1}


def release_steps(pretrain_steps: int) -> int:
    return max(1, round(pretrain_steps * RELEASE["fraction"]))


def release_key(base_dir: Path) -> str:
    """The release's cache key: the BF16 base it starts from (its own key is in its name) and RELEASE."""
    blob = json.dumps({"base": Path(base_dir).name, "release": RELEASE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def mxfp4_qat(model, tokenizer, steps: int, seed: int, log: Callable[[str], None], device: str = "cpu"):
    """QAT of the whole model with MXFP4 fake-quantized experts, on fresh pre-training rows (seed + offset).

    Same loop, batch size and clipping as the pre-training, at RELEASE['lr'] (a tenth of the pre-training's peak:
    the weights only have to settle on the grid, not learn anew). Returns the quantized (modelopt) model."""
    backend = modelopt_glue.resolve_backend("torch", device)  # ours runs on CPU; modelopt's MX kernels are CUDA-only
    model = model.to(device)
    model = modelopt_glue.quantize(model, "mxfp4", None, backend)  # MX scales come from each block: no calibration
    model.train()
    torch.manual_seed(seed + RELEASE["seed_offset"])
    batch_size = embedded_model.PRETRAIN["batch_size"]
    rows = demo_tasks.pretrain_rows(steps * batch_size, seed + RELEASE["seed_offset"])
    examples = embedded_model.encode_rows(tokenizer, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RELEASE["lr"], betas=embedded_model.PRETRAIN["betas"],
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: embedded_model.lr_factor(s, steps))
    with embedded_model.deterministic_torch():
        embedded_model.train_loop(model, examples, optimizer, scheduler, tokenizer.pad_token_id, steps,
                                  max(1, steps // 5), lambda m: log(f"MXFP4 release: {m}"))
    model.eval()
    return model.to("cpu")


def ensure_mxfp4_base(cache_root: Path, steps: int = 600, log: Callable[[str], None] = print, seed: int = 0,
                      device: str = "cpu", on_step: Callable[[int, int], None] | None = None,
                      shape: dict | None = None) -> Path:
    """The embedded base as an OpenAI-layout MXFP4 checkpoint (BF16 pre-training, then the MXFP4 QAT phase),
    built once and cached beside the BF16 base; later calls return it at once."""
    from transformers import GptOssForCausalLM

    cache_root = Path(cache_root)
    base_dir = embedded_model.ensure_tiny_base(cache_root, steps=steps, log=log, seed=seed, device=device,
                                               on_step=on_step, shape=shape)
    target = cache_root / f"tiny-gpt-oss-mxfp4-{release_key(base_dir)}"
    if (target / "config.json").exists():
        log(f"tiny MXFP4 base cached at {target}")
        return target
    log(f"releasing the tiny base in MXFP4 ({release_steps(steps)} QAT steps at lr {RELEASE['lr']}) ...")
    started = time.perf_counter()
    tokenizer = embedded_model.load_tokenizer(base_dir)
    model = GptOssForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="eager")
    model = mxfp4_qat(model, tokenizer, release_steps(steps), seed, log, device)
    seconds = time.perf_counter() - started
    # gpt-oss ships everything but the experts in BF16: so does this release.
    export_mxfp4.export_mxfp4(model, tokenizer, target, dtype=torch.bfloat16)
    info = {"base": base_dir.name, "release": RELEASE, "steps": release_steps(steps), "device": device,
            "seconds": round(seconds, 1)}
    (target / "release.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)
    log(f"tiny MXFP4 base ready in {seconds:.0f}s at {target}")
    return target
