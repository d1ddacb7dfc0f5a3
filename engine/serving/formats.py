"""What a checkpoint needs to be served, and whether this machine (or the chosen backend) has it.

The format comes from the checkpoint's config.json `quantization_config`:
    {"quant_method": "mxfp4"}                                  OpenAI's gpt-oss layout (engine/fp4/export_mxfp4.py)
    {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"}  NVFP4 weights, bf16 activations
    {"quant_method": "modelopt", "quant_algo": "NVFP4"}        NVFP4 W4A4: activations quantized too (input scales)
    none                                                       a plain BF16/FP32 model (e.g. the SFT output)
GPUs come from NVML (no torch import: the web process stays light). The checks turn "the server died with a
kernel error" into a sentence before anything starts.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_LABELS = {
    "mxfp4": "MXFP4 (OpenAI gpt-oss layout)",
    "nvfp4": "NVFP4 weight-only (W4A16, modelopt)",
    "nvfp4_w4a4": "NVFP4 W4A4 (weights and activations, modelopt)",
    "bf16": "unquantized (BF16/FP32)",
    "unknown": "unknown",
}
BLACKWELL = (10, 0)
HOPPER = (9, 0)


@dataclass
class CheckpointInfo:
    path: str
    format: str  # one of FORMAT_LABELS
    model_type: str | None = None
    dtype: str | None = None
    quantization: dict = field(default_factory=dict)
    harmony: bool = False  # the tokenizer's chat template speaks harmony (<|channel|>)
    response_template: bool = False  # the tokenizer tells transformers how to split channels
    embedded_demo: bool = False  # the embedded tiny gpt-oss (or a model trained from it): knows only the demo tasks
    problem: str | None = None  # why it cannot be read at all

    @property
    def label(self) -> str:
        return FORMAT_LABELS.get(self.format, self.format)


@dataclass
class Finding:
    level: str  # "error" (refuse to start), "warning", "info"
    text: str


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        return CheckpointInfo(str(path), "unknown", problem=f"{config_file} not found: not a Hugging Face model dir")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return CheckpointInfo(str(path), "unknown", problem=f"{config_file} is not readable JSON: {exc}")
    qcfg = config.get("quantization_config") or {}
    info = CheckpointInfo(str(path), quant_format(qcfg), model_type=config.get("model_type"),
                          dtype=config.get("dtype") or config.get("torch_dtype"), quantization=qcfg)
    info.harmony, info.response_template = _tokenizer_traits(path)
    info.embedded_demo = is_embedded_demo(path)
    return info


EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tokenizer" / "tokenizer.json"
_EMBEDDED_TOKENIZER_MAX_BYTES = 1 << 20  # ours is 86 kB; gpt-oss's o200k tokenizer.json is ~27 MB: never parsed


def is_embedded_demo(path: str | Path) -> bool:
    """The checkpoint speaks the embedded tiny model's tokenizer (same BPE vocabulary and merges): it is the embedded
    demo model or was trained from it. A real gpt-oss never shares that 1.5k-token vocabulary."""
    file = Path(path) / "tokenizer.json"
    try:
        if file.stat().st_size > _EMBEDDED_TOKENIZER_MAX_BYTES:
            return False
        return _bpe_model(file.read_text()) == _bpe_model(EMBEDDED_TOKENIZER.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False


@functools.lru_cache(maxsize=8)
def _bpe_model(text: str) -> str:
    model = json.loads(text)["model"]
    return json.dumps([model["vocab"], model["merges"]], sort_keys=True)


def quant_format(qcfg: dict) -> str:
    method = str(qcfg.get("quant_method") or "").lower()
    if not method:
        return "bf16"
    if method == "mxfp4":
        return "mxfp4"
    if method == "modelopt":
        algo = str(qcfg.get("quant_algo") or "").upper()
        if algo == "W4A16_NVFP4":
            return "nvfp4"
        if algo == "NVFP4" or _has_input_quantizers(qcfg):
            return "nvfp4_w4a4"
    return "unknown"


def _has_input_quantizers(qcfg: dict) -> bool:
    groups = qcfg.get("config_groups") or {}
    return any(isinstance(g, dict) and g.get("input_activations") for g in groups.values())


def _tokenizer_traits(path: Path) -> tuple[bool, bool]:
    try:
        tok = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False, False
    template = tok.get("chat_template") or ""
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return "<|channel|>" in str(template), bool(tok.get("response_template"))


@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[dict, ...]:
    """({index, name, capability: (major, minor), memory_gb}, ...) from the telemetry's NVML reading; () when there
    is no driver or GPU. A capability NVML cannot read is (0, 0): no format check passes on a GPU of unknown kind."""
    from engine.runtime import telemetry

    found, _ = telemetry.gpus()
    return tuple({"index": g["index"], "name": g["name"], "capability": tuple(g.get("capability") or (0, 0)),
                  "memory_gb": round(g.get("mem_total_gb") or 0.0, 1)} for g in found)


def gpu_summary(gpus: tuple[dict, ...] | None = None) -> str:
    gpus = detect_gpus() if gpus is None else gpus
    if not gpus:
        return "no NVIDIA GPU on this machine"
    return ", ".join(f"{g['name']} (sm_{g['capability'][0]}{g['capability'][1]}, {g['memory_gb']} GiB)" for g in gpus)


def check_compatibility(backend, info: CheckpointInfo, gpus: tuple[dict, ...] | None = None) -> list[Finding]:
    """What stands between `info` and a running `backend` server here. Errors block starting (not showing the
    command: it may well run on another machine)."""
    gpus = detect_gpus() if gpus is None else gpus
    found: list[Finding] = []
    if info.problem:
        return [Finding("error", info.problem)]
    if backend.needs_gpu and not gpus:
        found.append(Finding("error", f"{backend.label} needs an NVIDIA GPU and this machine has none: run the "
                                      "command below on a GPU machine, or use the transformers backend here."))
    found += _format_findings(backend.name, info, gpus)
    if info.harmony and not info.response_template and backend.name == "transformers":
        found.append(Finding("info", "The tokenizer has no response template, so the server is given a view of the "
                                     "checkpoint whose tokenizer_config.json adds harmony's (weights are symlinks): "
                                     "it then returns the analysis channel as reasoning_content."))
    return found


def _format_findings(backend: str, info: CheckpointInfo, gpus: tuple[dict, ...]) -> list[Finding]:
    best = max((g["capability"] for g in gpus), default=None)
    fmt = info.format
    if fmt == "unknown":
        return [Finding("warning", f"unrecognised quantization_config {info.quantization!r}; the server decides")]
    if fmt == "nvfp4_w4a4" and backend == "transformers":
        return [Finding("error", "transformers cannot load NVFP4 W4A4 (modelopt) checkpoints, and no plain copy "
                                 "computes what it computes (its activations are quantized too); serve it with vLLM "
                                 "or TensorRT-LLM on a Blackwell GPU (the command below).")]
    if fmt == "nvfp4" and backend == "transformers":
        return [Finding("info", "transformers cannot load modelopt NVFP4 checkpoints, so it serves a dequantized copy "
                                "this app writes next to the export (once): float32 expert weights equal to the "
                                "trained fake-quant weights (bf16 would round NVFP4 values), twice the memory of "
                                "BF16 experts. Native NVFP4 kernels: vLLM / TensorRT-LLM on a GPU.")]
    if fmt == "nvfp4_w4a4" and best is not None and best < BLACKWELL:
        return [Finding("error", f"NVFP4 W4A4 needs Blackwell-class GPUs (sm_100+) for FP4 activations; this "
                                 f"machine has {gpu_summary(gpus)}. Export NVFP4 weight-only or MXFP4 for Hopper.")]
    if fmt == "nvfp4_w4a4":
        return [Finding("info", "NVFP4 W4A4 needs Blackwell-class GPUs (sm_100+) to serve.")]
    if fmt == "nvfp4" and best is not None and best < BLACKWELL:
        return [Finding("warning", "NVFP4 weight-only on a pre-Blackwell GPU runs only through the backend's "
                                   "weight-only fallback kernels (e.g. vLLM's Marlin FP4), if your version has them.")]
    if fmt == "mxfp4":
        return _mxfp4_findings(backend, best)
    return []


def _mxfp4_findings(backend: str, best: tuple | None) -> list[Finding]:
    if backend == "transformers":
        where = "on CPU" if best is None else "unless Triton >= 3.4 and the `kernels` package are installed"
        return [Finding("info", f"MXFP4 experts are dequantized to bf16 when loaded {where}: same numbers, bf16 "
                                "memory. MXFP4 serves natively on Hopper via vLLM/SGLang/TRT-LLM W4A16 kernels.")]
    if best is not None and best < HOPPER:
        return [Finding("warning", "MXFP4 MoE kernels in vLLM/SGLang/TRT-LLM target Hopper (sm_90) and Blackwell "
                                   "(sm_100); older GPUs may fall back to slower paths or fail.")]
    return [Finding("info", "MXFP4 serves on Hopper via W4A16 kernels and natively on Blackwell.")]
