"""Stage outputs that hold only what a stage changed, plus a pointer to the model it started from.

Why: each stage used to write the whole model under runs/<id>/models/. For gpt-oss-20b that is ~42 GB in BF16 per
stage: sft, ptq and qat for two formats make ~210 GB for one run, more than the lent GPU machine's 64 GiB disk. What
a stage really changes is small:
  - LoRA SFT / LoRA QAT: the adapters (megabytes; peft's adapter_config.json + adapter_model.safetensors);
  - PTQ: the quantizers (modelopt's state and the calibrated amax buffers, `quantizers.pth`);
  - LoRA QAT also keeps its quantizer buffers, so the QAT model is rebuilt exactly as it was trained even if a
    quantizer buffer moved while training.
Such a directory has `stage.json` = {"parent": <job key>, "adapter": <subdir or null>, "quantizers": <file or null>}
and the tokenizer. `load` rebuilds the model: the parent (recursively, down to the base checkpoint or a full
stage directory), then the quantizers, then the adapter merged the way the training stage merged it (peft's
merge_and_unload, W <- W + BA, the same op as before), so later stages see the model the old full copies held.
Full fine-tuning (no LoRA) still writes whole models: there every weight changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.fp4 import model_io
from engine.runtime import workspace

STAGE_FILE = "stage.json"
ADAPTER_DIR = "adapter"
QUANTIZERS_FILE = "quantizers.pth"


def is_lean(path: Path) -> bool:
    return (Path(path) / STAGE_FILE).exists()


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / STAGE_FILE).read_text())


def _write(out_dir: Path, parent: str, tokenizer, write) -> Path:
    """Write into `<out_dir>.tmp` (write(tmp) -> meta fields), then rename over `out_dir`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"parent": parent, "adapter": None, "quantizers": None, **write(tmp)}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=2))
    model_io.replace_dir(tmp, out_dir)
    return out_dir


def quantizer_state(model: torch.nn.Module) -> dict:
    """modelopt's state (which quantizers exist, their formats) and every quantizer buffer (amax), on CPU."""
    import modelopt.torch.opt as mto

    buffers = {k: v.detach().to("cpu") for k, v in model.state_dict().items() if "_quantizer." in k}
    return {"modelopt_state": mto.modelopt_state(model), "buffers": buffers}


def save_quantized(out_dir: Path, parent: str, model: torch.nn.Module, tokenizer) -> Path:
    """PTQ: the quantizers only; the weights are the parent's (calibration does not change them)."""

    def write(tmp: Path) -> dict:
        torch.save(quantizer_state(model), tmp / QUANTIZERS_FILE)
        return {"quantizers": QUANTIZERS_FILE}

    return _write(out_dir, parent, tokenizer, write)


def save_adapter(out_dir: Path, parent: str, adapters, tokenizer, quantized_model: torch.nn.Module | None = None):
    """LoRA stages: the adapters (a PeftModel from TRL, or the LoraModel that lora.add_adapters injected), plus the
    quantizers of `quantized_model` (QAT)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    def write(tmp: Path) -> dict:
        target = tmp / ADAPTER_DIR
        if isinstance(adapters, PeftModel):
            adapters.save_pretrained(str(target))
            kind = "peft_model"
        else:  # injected in place: peft's own save needs a PeftModel, so its two files are written here
            target.mkdir()
            adapters.peft_config["default"].save_pretrained(str(target))
            state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(adapters).items()}
            save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
            kind = "injected"
        meta = {"adapter": ADAPTER_DIR, "adapter_kind": kind}
        if quantized_model is not None:
            torch.save(quantizer_state(quantized_model), tmp / QUANTIZERS_FILE)
            meta["quantizers"] = QUANTIZERS_FILE
        return meta

    return _write(out_dir, parent, tokenizer, write)


def lineage(run_dir: Path, key: str) -> list[str]:
    """The job keys `load` reads for `key`, nearest first: `key`, its parent, ... down to a whole model."""
    keys = [key]
    path = workspace.model_path(Path(run_dir), key)
    while is_lean(path):
        keys.append(read_meta(path)["parent"])
        if len(keys) > 16:  # the pipeline's deepest lineage is 4 (qat -> ptq -> sft -> prepare)
            raise ValueError(f"{path / STAGE_FILE}: the chain of parents does not end: {keys}")
        path = workspace.model_path(Path(run_dir), keys[-1])
    return keys


def load(run_dir: Path, key: str, dtype, device, backend: str | None, trust_remote_code: bool = False,
         kept: dict | None = None):
    """The model of the stage with job key `key`, rebuilt from its lineage (see the module doc).

    `kept`: {job key: model} already in memory and unchanged since it was loaded (the model a chained job process
    holds, engine/stages/common.py). When one of them is on `key`'s lineage the rest is built on it instead of reading
    the base again (at 20b size a load is a 13 GB read upcast to 42 GB); it is taken out of `kept`, since it is changed
    in place (quantizers inserted, adapters merged)."""
    if kept and key in kept:
        return kept.pop(key)
    path = workspace.model_path(Path(run_dir), key)
    if not is_lean(path):
        quantized = (path / "modelopt_state.pth").exists()
        return model_io.load_model(path, dtype, device, backend=backend if quantized else None,
                                   trust_remote_code=trust_remote_code)
    meta = read_meta(path)
    model = load(run_dir, meta["parent"], dtype, device, backend, trust_remote_code, kept)
    state = torch.load(path / meta["quantizers"], map_location="cpu", weights_only=False) if meta["quantizers"] else None
    if state is not None and not model_io.is_modelopt_model(model):
        _restore_quantizers(model, state["modelopt_state"], backend)
    if meta["adapter"]:
        model = _merge_adapter(model, path / meta["adapter"], meta.get("adapter_kind", "peft_model"))
    if state is not None:
        _load_buffers(model, state["buffers"], path)
    return model


def _restore_quantizers(model, modelopt_state: dict, backend: str | None) -> None:
    import modelopt.torch.opt as mto

    from engine.fp4 import modelopt_glue, torch_backend

    if backend is not None:
        torch_backend.register()  # restored quantizers name our backend; it must exist before the first forward
    mto.restore_from_modelopt_state(model, modelopt_state)
    modelopt_glue.set_backend(model, backend)


def _load_buffers(model, buffers: dict, path: Path) -> None:
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in buffers.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path / QUANTIZERS_FILE}: quantizer buffers the model lacks: {result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys if "_quantizer." in k]
    if missing:
        raise ValueError(f"{path / QUANTIZERS_FILE}: quantizer buffers missing: {missing[:5]}")


def _merge_adapter(model, adapter_dir: Path, kind: str):
    """Apply the saved adapter the way its stage held it, then merge it as the stage's export would have."""
    from peft import LoraConfig, LoraModel, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from engine.fp4 import modelopt_glue
    from engine.training import lora

    if kind == "peft_model":
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    config = LoraConfig.from_pretrained(str(adapter_dir))
    tuner = LoraModel(model, config, "default")
    if modelopt_glue.is_quantized(model):
        lora.prepare_for_qat(model, log=lambda _: None)
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(tuner, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir}: adapter weights the model has no place for: {result.unexpected_keys[:5]}")
    return lora.merge(tuner)


def expert_weights_in_memory(run_dir: Path, key: str, reference_key: str) -> bool:
    """True when the weights of stage `key` are those of `reference_key` untouched (a PTQ stage on it): its
    master weights are then the reference for the weight error, with no second model to read."""
    path = workspace.model_path(Path(run_dir), key)
    if not is_lean(path):
        return False
    meta = read_meta(path)
    return meta["adapter"] is None and meta["parent"] == reference_key


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
