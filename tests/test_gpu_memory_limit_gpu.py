"""hardware.gpu_memory_limit_gib on a real card (run on the device machine; skipped without CUDA).

A process capped the way every job process caps itself (engine/stages/job.py cap_gpu_memory) cannot allocate past
the limit while the card has room, and evaluation's 'auto' batch sizes for the cap, not the card's free memory; the smoke recipe under a 3 GiB limit runs through the engine with every CUDA job
capped (chained jobs included) and no job's reserved peak above it; `launch.py run` refuses a limit above the card.
The CPU side (fraction, messages, estimator, flag) is in tests/test_gpu_memory_limit.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage import Store
from tests.helpers import launch, stop_engines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3

# Runs in a fresh process: the cap is per process and would stay on pytest's own allocator.
CAPPED_PROCESS = r"""
import json, sys, torch
from engine.recipe.configs import Recipe
from engine.runtime.gpu_memory import GpuMemoryLimitError, apply_limit
from engine.stages.job import cap_gpu_memory

GIB, limit, out = 1024**3, 4, {}
device = torch.device("cuda:0")
out["free_gib"] = torch.cuda.mem_get_info(0)[0] / GIB
over = torch.empty(int((limit + 1) * GIB), dtype=torch.uint8, device=device)  # uncapped: the card has room
out["uncapped_over_limit_ok"] = True
del over
torch.cuda.empty_cache()
try:
    apply_limit(100000, device)
except GpuMemoryLimitError as exc:
    out["too_big"] = str(exc)
cap_gpu_memory(Recipe.model_validate({"hardware": {"gpu_memory_limit_gib": limit}}), device)
held = torch.empty(int((limit - 1) * GIB), dtype=torch.uint8, device=device)  # under the cap: fine
out["under_limit_ok"] = True
from engine.evaluation.evaluator import usable_free_bytes  # what sizes evaluation's 'auto' batch
out["usable_free_gib"] = usable_free_bytes(*torch.cuda.mem_get_info(0), torch.cuda.memory_reserved(0),
                                           torch.cuda.memory_allocated(0),
                                           torch.cuda.get_per_process_memory_fraction(0)) / GIB
for name, gib in (("second", 1.5), ("alone", limit + 0.5)):
    if name == "alone":
        del held
        torch.cuda.empty_cache()
    try:
        torch.empty(int(gib * GIB), dtype=torch.uint8, device=device)
        out[name] = "allocated"
    except torch.OutOfMemoryError as exc:
        out[name] = "OutOfMemoryError: " + str(exc).splitlines()[0]
out["free_gib_after"] = torch.cuda.mem_get_info(0)[0] / GIB
print("RESULT " + json.dumps(out))
"""


def test_a_capped_job_process_cannot_allocate_past_the_limit():
    proc = subprocess.run([sys.executable, "-c", CAPPED_PROCESS], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(proc.stdout)
    assert "GPU memory capped at 4 GiB (hardware.gpu_memory_limit_gib)" in proc.stdout
    assert out["free_gib"] > 6 and out["uncapped_over_limit_ok"] and out["under_limit_ok"]
    assert out["too_big"].startswith("hardware.gpu_memory_limit_gib: 100000 GiB is more than the card has")
    assert 0.9 < out["usable_free_gib"] <= 1.001, out  # the cap's 4 GiB less the 3 held, not the card's free memory
    assert out["second"].startswith("OutOfMemoryError"), out  # 3 GiB held + 1.5 GiB > 4 GiB
    assert out["alone"].startswith("OutOfMemoryError"), out  # 4.5 GiB on its own, nothing else held
    assert out["free_gib_after"] > 6  # refused by the cap, not by a full card


def test_the_smoke_run_under_a_limit(tmp_path, shared_cache, monkeypatch):
    """Every CUDA job (the first of each process and the chained ones) logs the cap; none reserved more."""
    limit = 3
    workdir = tmp_path / "ws"
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    store = None
    try:
        proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--hardware.device", "cuda",
                       "--hardware.gpu_memory_limit_gib", str(limit)], timeout=1500)
        store = Store(workdir / "studio.db")
        jobs = store.list_jobs(store.list_runs()[0]["id"])
        assert proc.returncode == 0 and all(j["status"] == "succeeded" for j in jobs), (
            proc.stdout[-3000:] + proc.stderr[-3000:], [(j["config"]["key"], j["status"], j["error"]) for j in jobs])
        cuda_jobs = [j for j in jobs if j["resources"].startswith("cuda")]
        assert cuda_jobs
        for job in cuda_jobs:
            log = Path(job["log_path"]).read_text()
            assert f"GPU memory capped at {limit} GiB (hardware.gpu_memory_limit_gib)" in log, job["config"]["key"]
            reserved = (job["timing"] or {}).get("peak_gpu_reserved_gib")
            print(job["config"]["key"], job["timing"])
            assert reserved is not None and reserved <= limit, (job["config"]["key"], job["timing"])
    finally:
        if store is not None:
            stop_engines(store)


def test_run_refuses_a_limit_above_the_card(tmp_path):
    proc = launch(["--workdir", str(tmp_path / "ws"), "run", "assets/recipes/smoke.yaml", "--hardware.device", "cuda",
                   "--hardware.gpu_memory_limit_gib", "100000"], timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"hardware.gpu_memory_limit_gib: 100000 GiB is more than GPU 0 ({torch.cuda.get_device_name(0)}) has" \
        in proc.stderr
    assert "lower it to at most" in proc.stderr
    assert not (tmp_path / "ws" / "studio.db").exists()  # nothing written
