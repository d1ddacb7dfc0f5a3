"""Loading and saving models between stages.

Whole stage outputs (full fine-tuning) are Hugging Face model directories; LoRA and PTQ stages keep only what they
changed (engine/training/stage_outputs.py, which loads whole ones through here). Quantized ones carry `modelopt_state.pth` (modelopt's
`enable_huggingface_checkpointing` saves and restores the quantizers with save_pretrained / from_pretrained),
so every stage loads its input the same way. Saves go to a temp dir that is renamed into place: a kill
during a save never leaves a directory that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from engine.fp4 import modelopt_glue

_CHECKPOINTING_ENABLED = False


def enable_modelopt_checkpointing() -> None:
    global _CHECKPOINTING_ENABLED
    if not _CHECKPOINTING_ENABLED:
        import modelopt.torch.opt as mto

        from engine.fp4.import_leaks import drop_pulp_import_tracebacks

        drop_pulp_import_tracebacks()  # see engine/fp4/import_leaks.py
        mto.enable_huggingface_checkpointing()
        _CHECKPOINTING_ENABLED = True


def is_mxfp4_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.exists():
        return False
    qcfg = json.loads(config.read_text()).get("quantization_config") or {}
    return qcfg.get("quant_method") == "mxfp4"


def check_gpt_oss_checkpoint(path: Path) -> dict:
    """Check a gpt-oss checkpoint dir without loading it: config, weight files, expert tensors (MXFP4 blocks and
    scales with the shapes the config implies, or plain weights), tokenizer with a chat template.
    Returns a summary; raises ValueError naming the problem."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "gpt_oss":
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}, not 'gpt_oss'; "
                         "QAT Studio trains gpt-oss models")
    keys = _safetensors_shapes(path)
    quantized = is_mxfp4_checkpoint(path)
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    for i in range(layers):
        for name, (inp, out) in {"gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)}.items():
            base = f"model.layers.{i}.mlp.experts.{name}"
            expected = ({f"{base}_blocks": (experts, out, inp // 32, 16), f"{base}_scales": (experts, out, inp // 32)}
                        if quantized else {base: (experts, inp, out)})
            for key, shape in expected.items():
                if key not in keys:
                    raise ValueError(f"{path}: {key} missing from the weight files; not a complete gpt-oss checkpoint")
                if tuple(keys[key]) != shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(keys[key])}, the config implies {shape}")
    _check_chat_template(path)
    return {"layers": layers, "experts": experts, "hidden_size": hidden, "quantized": quantized,
            "tensors": len(keys)}


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors weight files (QAT Studio reads safetensors checkpoints)")
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = f.get_slice(key).get_shape()
    return shapes


def _check_chat_template(path: Path) -> None:
    """SFT renders the data with the tokenizer's chat template: a checkpoint without one cannot be trained here."""
    if (path / "chat_template.jinja").exists():
        return
    tokenizer_config = path / "tokenizer_config.json"
    if not tokenizer_config.exists():
        raise ValueError(f"{path}: no tokenizer (tokenizer_config.json); a gpt-oss checkpoint ships its tokenizer")
    if not json.loads(tokenizer_config.read_text()).get("chat_template"):
        raise ValueError(f"{path}: the tokenizer has no chat template (tokenizer_config.json chat_template or "
                         "chat_template.jinja); gpt-oss's harmony template is needed to render the training data")


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    backend: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a stage's model (plain, quantized with modelopt state, or an OpenAI MXFP4 checkpoint upcast)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    local = Path(path)
    if (local / "modelopt_state.pth").exists():  # importing modelopt costs ~10 s: only for quantized models
        enable_modelopt_checkpointing()
    if backend is not None:
        from engine.fp4 import torch_backend

        torch_backend.register()  # restored quantizers name our backend; it must exist before the first forward
    kwargs: dict = {"dtype": dtype, "attn_implementation": "eager", "trust_remote_code": trust_remote_code}
    if torch.device(device).type == "cuda":
        # Straight to the GPU, shard by shard (and MXFP4 experts dequantized there): a 20b model never sits whole in
        # CPU RAM first, and the upcast runs on the GPU instead of the CPU.
        kwargs["device_map"] = str(torch.device(device))
    if local.is_dir() and is_mxfp4_checkpoint(local):
        # OpenAI's gpt-oss ships MXFP4 experts; we train in high precision, so dequantize on load.
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.to(device)
    if is_modelopt_model(model):
        modelopt_glue.set_backend(model, backend)
    return model


def is_modelopt_model(model) -> bool:
    """True when modelopt converted the model (quantizers inside); needs no modelopt import to answer."""
    return any(type(m).__module__.startswith("modelopt.") for m in model.modules())


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def save_model_atomic(model, tokenizer, out_dir: Path) -> Path:
    """save_pretrained into `<out_dir>.tmp`, then rename over `out_dir`."""
    if is_modelopt_model(model):  # modelopt_state.pth goes with quantized models only
        enable_modelopt_checkpointing()
    # TRL turns router-logit outputs on to add the MoE aux loss while training; saved that way, generation breaks
    # (transformers' load-balancing loss does not handle padded generation batches) and every forward pays for it.
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing an older `dst`: the old one is renamed away first, then deleted."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
