"""A plain (dequantized) copy of an NVFP4 export, for servers that cannot load modelopt's NVFP4 format.

transformers (5.x) refuses pre-quantized modelopt NVFP4 checkpoints, so `transformers serve` (the embedded, CPU
backend) is given this copy instead: the same directory with every packed expert weight decoded back to the values
the QAT model computed with, `quantization_config` removed, and nothing else changed.

- Expert weights are written in float32 and config.json says `dtype: float32`, so `--dtype auto` serves exactly the
  fake-quant weights: an NVFP4 value is e2m1 x E4M3 block scale x an arbitrary float32 per-tensor scale, which bf16
  (8 significant bits) cannot hold. (A bf16-trained model's fake-quant weights are these values rounded to bf16:
  serve with `--dtype bfloat16` to get them, at half the memory.) The other tensors keep their stored dtype; the
  float32 load upcasts them exactly.
- The copy lives next to the export (`<export>-dequantized`), is written once (temporary directory, then renamed)
  and rewritten when the export's files change (`dequantized_from.json` records their sizes and times).
- Tensors are decoded and written one at a time, shard by shard, so memory stays at about one shard.
- W4A4 exports (`quant_algo: NVFP4`) are refused: their activations were quantized too, which no plain copy can do.

    python -m engine.fp4.dequantize_nvfp4 EXPORT_DIR [OUT_DIR]     writes the copy by hand (what the app runs)
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUFFIX = "-dequantized"
STAMP = "dequantized_from.json"
SCALE_SUFFIXES = ("_weight_scale", "_weight_scale_2", "_input_scale")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
SKIPPED = {"config.json", "hf_quant_config.json", "model.safetensors.index.json", STAMP}
MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default "5GB"


def default_dir(export_dir: Path | str) -> Path:
    export_dir = Path(export_dir).resolve()
    return export_dir.with_name(export_dir.name + SUFFIX)


def dequantized_copy(export_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """The copy of `export_dir` (written now unless an up-to-date one exists); returns its directory."""
    export_dir = Path(export_dir).resolve()
    out_dir = Path(out_dir) if out_dir else default_dir(export_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:  # two servers started at once: one writes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(export_dir, out_dir):
            return out_dir
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_dequantized(export_dir, tmp)
            (tmp / STAMP).write_text(json.dumps(_stamp(export_dir), indent=2))
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_dequantized(export_dir: Path, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write the dequantized copy of `export_dir` into the existing directory `out_dir`; returns the weight files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((export_dir / "config.json").read_text())
    check_weight_only(export_dir, config.get("quantization_config") or {})
    where = _tensor_files(export_dir)
    sizes = _output_sizes(where)
    plan = shard_groups(sizes, max_shard_bytes)
    files = [_shard_name(i, len(plan)) for i in range(len(plan))]
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt")) for path in set(where.values())}
        for filename, names in zip(files, plan):
            shard = {name: _output_tensor(name, lambda key: handles[where[key]].get_tensor(key)) for name in names}
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
    if len(files) > 1:
        weight_map = {name: filename for filename, names in zip(files, plan) for name in names}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for entry in export_dir.iterdir():  # tokenizer, chat template, generation config: copied as they are
        if entry.is_file() and entry.name not in SKIPPED and entry.suffix != ".safetensors":
            shutil.copy2(entry, out_dir / entry.name)
    return files


def check_weight_only(export_dir: Path, qcfg: dict) -> None:
    method, algo = str(qcfg.get("quant_method") or ""), str(qcfg.get("quant_algo") or "").upper()
    if method != "modelopt" or algo != "W4A16_NVFP4":
        raise ValueError(f"{export_dir}: not an NVFP4 weight-only export (quantization_config {qcfg!r}); only "
                         "W4A16_NVFP4 has a plain equivalent (W4A4 also quantizes the activations)")


def decode_expert(packed: torch.Tensor, scales: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """modelopt's stored layout, (E, in/2, out) codes + (E, in/B, out) scales (blocks along in), -> (E, in, out)."""
    from engine.fp4 import torch_backend  # torch: imported when a copy is written, not when its path is asked

    weight = torch_backend.nvfp4_decode(packed.transpose(-1, -2).contiguous(), scales.transpose(-1, -2).contiguous(),
                                        scale_2)
    return weight.transpose(-1, -2).contiguous()


def _is_packed_expert(name: str, dtype) -> bool:
    """dtype: safetensors' name ("U8") or a torch dtype."""
    return name.endswith(EXPERT_WEIGHTS) and str(dtype) in ("U8", "torch.uint8")


def _output_tensor(name: str, get) -> torch.Tensor:
    tensor = get(name)
    if _is_packed_expert(name, tensor.dtype):
        return decode_expert(tensor, get(f"{name}_weight_scale"), get(f"{name}_weight_scale_2"))
    return tensor


def _tensor_files(export_dir: Path) -> dict[str, Path]:
    """Every stored tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{export_dir}: no *.safetensors files")
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in f.keys()})
    return where


def _output_sizes(where: dict[str, Path]) -> dict[str, int]:
    """Bytes of each tensor of the copy (scales dropped, packed experts as float32), in a stable order."""
    from safetensors import safe_open

    sizes = {}
    for path in sorted(set(where.values())):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIXES):
                    continue
                piece = f.get_slice(name)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                count = 1
                for dim in shape:
                    count *= dim
                sizes[name] = count * 2 * 4 if _is_packed_expert(name, dtype) else count * _DTYPE_BYTES[dtype]
    return dict(sorted(sizes.items()))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def shard_groups(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names of at most `max_bytes` each (a bigger tensor gets a shard of its own), in order,
    as huggingface_hub's splitter groups them; for writers that know sizes before they have the tensors."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _stamp(export_dir: Path) -> dict:
    files = sorted(p for p in export_dir.iterdir() if p.is_file())
    return {"source": str(export_dir), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def _is_current(export_dir: Path, out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / STAMP).read_text()) == _stamp(export_dir)
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m engine.fp4.dequantize_nvfp4 EXPORT_DIR [OUT_DIR]")
    print(dequantized_copy(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
