"""The fused Triton FP4 kernel, run by Triton's CPU interpreter: same bits as the torch-ops backend.

The GPU file (test_fp4_triton_gpu.py) checks the compiled kernel; this one keeps the kernel's arithmetic under
test on every CPU CI run. The interpreter has no libdevice, so log2 comes from numpy there (it only matters for
float32 inputs within an ulp of a power of two; none of these cases), and it flushes subnormal bf16 inputs to zero,
so the crafted 'tiny' (subnormal) blocks are left to the GPU test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton) - needed to interpret the kernel")

SCRIPT = r"""
import json, sys
import torch
from engine.fp4 import torch_backend
from engine.fp4.triton_kernel import fake_quant_3d, fake_quant_last_dim
from tests.test_fp4 import crafted_cases, random_weights

def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)

out = {}
for dtype in (torch.bfloat16, torch.float32):
    w = random_weights((3, 64, 48), dtype, seed=5)
    amax = w.abs().amax().float()
    t = w.transpose(1, 2).contiguous()
    for kind, block in (("mx", 32), ("nv", 32), ("nv", 16)):
        scale = torch_backend.nvfp4_global_scale(w, amax) if kind == "nv" else None
        got = fake_quant_3d(w, kind, block, scale)
        ref = (torch_backend.mxfp4_fake_quant(t, block) if kind == "mx" else torch_backend.nvfp4_fake_quant(t, block, amax)).transpose(1, 2)
        out[f"{kind}{block}/{dtype}/experts"] = int((bits(got) != bits(ref.contiguous())).sum())
    for name, x in crafted_cases(32).items():
        if name == "tiny":  # subnormal inputs: the interpreter's bf16 -> fp32 load flushes them (the GPU test checks them)
            continue
        x = x.to(dtype)
        for kind in ("mx", "nv"):
            scale = torch_backend.nvfp4_global_scale(x) if kind == "nv" else None
            got = fake_quant_last_dim(x, kind, 32, scale)
            ref = torch_backend.mxfp4_fake_quant(x, 32) if kind == "mx" else torch_backend.nvfp4_fake_quant(x, 32)
            out[f"{kind}/{dtype}/{name}"] = int((bits(got) != bits(ref)).sum())
print(json.dumps(out))
"""


def test_interpreted_kernel_is_bit_exact_with_torch_backend():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mismatches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(mismatches) > 20  # every case ran
    assert {k: v for k, v in mismatches.items() if v} == {}
