"""Where does a quantized model's extra GPU memory live? Builds bench/qat_step.py's model, quantizes it as a path of
that benchmark does, and lists the largest CUDA tensors alive afterwards that are not the model's parameters or
buffers, with what holds them. Memory held outside Python (e.g. an autograd graph) shows as the gap between
`memory_allocated` and the tensors found.

    python bench/mem_probe.py --path engine:nvfp4 [--no-grad-calibration]

Result: printed only (each tensor's size, shape and what holds it); nothing is written.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qat_step  # noqa: E402
import torch  # noqa: E402

GIB = 2**30


def device_tensors(device: str) -> dict[int, torch.Tensor]:
    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == device:
                found.setdefault(obj.untyped_storage().data_ptr(), obj)
        except Exception:  # noqa: BLE001,S112 - some objects raise on isinstance / storage access
            continue
    return found


def holders(tensor: torch.Tensor) -> list[str]:
    out = []
    for ref in gc.get_referrers(tensor):
        if isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is tensor]
            owner = next((type(o).__name__ for o in gc.get_referrers(ref) if hasattr(o, "__dict__")
                          and getattr(o, "__dict__", None) is ref), "dict")
            out.append(f"{owner}.{keys}")
        elif not isinstance(ref, type(sys._getframe())):
            out.append(type(ref).__name__)
    return out[:4]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default="engine:nvfp4")
    parser.add_argument("--no-grad-calibration", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny dims on CPU (checks the script, measures nothing)")
    args = parser.parse_args()
    dims = dict(hidden=256, intermediate=256, vocab=1024, seq=64, device="cpu") if args.smoke else {}
    bench_args = argparse.Namespace(**{**dict(layers=2, experts=32, topk=4, hidden=2880, intermediate=2880,
                                              vocab=201088, batch=4, seq=1024, sdpa=False, device="cuda"), **dims})
    batch = torch.randint(0, bench_args.vocab, (bench_args.batch, bench_args.seq), device=bench_args.device)
    model = qat_step.build_model(bench_args)
    allocated = torch.cuda.memory_allocated if bench_args.device == "cuda" else (lambda: 0)
    before = allocated()
    if args.no_grad_calibration:
        with torch.no_grad():
            model = qat_step.prepare(model, args.path, batch)
    else:
        model = qat_step.prepare(model, args.path, batch)
    gc.collect()
    after = allocated()
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    others = sorted(((t.untyped_storage().nbytes(), p, t) for p, t in device_tensors(bench_args.device).items() if p not in own),
                    key=lambda x: -x[0])
    print(f"{args.path} (calibration {'without' if args.no_grad_calibration else 'with'} grad): model "
          f"{before / GIB:.2f} GiB, after prepare {after / GIB:.2f} GiB (+{(after - before) / GIB:.2f}); "
          f"non-model CUDA tensors found in Python: {sum(n for n, _, _ in others) / GIB:.2f} GiB")
    for nbytes, _, t in others[:8]:
        print(f"  {nbytes / GIB:7.3f} GiB {tuple(t.shape)} {t.dtype} requires_grad={t.requires_grad} "
              f"grad_fn={type(t.grad_fn).__name__ if t.grad_fn else None} held by {holders(t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
