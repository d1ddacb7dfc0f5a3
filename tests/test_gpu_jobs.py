"""Telemetry and cancel on a real GPU (run on the device machine; skipped without CUDA).

The CPU suite checks the telemetry formatting and the cancel's process-tree kill; only a real driver can show that
NVML's readings are there, that NVML lists the job's own process (in a container NVML may report host pids, and then
"no process of this job holds memory" would be true of every job, released or not) and that a cancelled job's memory
is really given back.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.runtime import telemetry
from storage import Store
from tests.helpers import launch, stop_engines, wait_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def pids_on_gpu(index: int = 0) -> dict[int, float | None]:
    found, note = telemetry.gpus()
    assert note is None, note
    return {p["pid"]: p["mem_gb"] for p in found[index]["processes"]}


def test_nvml_reads_the_gpu_and_lists_this_process():
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")  # 1 GiB that NVML must attribute to us
    torch.cuda.synchronize()
    found, note = telemetry.gpus()
    assert note is None and found
    gpu = found[0]
    print({k: v for k, v in gpu.items() if k != "processes"}, gpu["processes"])
    assert gpu["name"] == torch.cuda.get_device_name(0)
    assert gpu["mem_total_gb"] > 10 and 1.0 <= gpu["mem_used_gb"] <= gpu["mem_total_gb"]
    assert 0 <= gpu["util_percent"] <= 100
    assert 0 < gpu["power_w"] <= gpu["power_limit_w"] * 1.2  # a momentary reading may overshoot the limit a little
    assert 0 < gpu["temp_c"] < 110 and gpu["sm_clock_mhz"] > 0
    mine = pids_on_gpu()
    assert os.getpid() in mine, f"NVML lists pids {sorted(mine)}, not this process ({os.getpid()})"
    assert mine[os.getpid()] is None or mine[os.getpid()] >= 1.0
    del held


def test_cancelled_gpu_job_gives_its_memory_back(tmp_path, shared_cache, monkeypatch):
    """The smoke recipe on cuda:0: NVML shows the SFT job's process while it trains; after the cancel the job says
    its memory was released, and NVML agrees. The engine recorded the run's GPU telemetry meanwhile."""
    workdir = tmp_path / "ws"
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--no-wait",
                   "--hardware.device", "cuda", "--sft.max_steps", "100000", "--sft.save_steps", "100000"])
    assert proc.returncode == 0, proc.stderr
    store = Store(workdir / "studio.db")
    run_id = store.list_runs()[0]["id"]
    try:  # a failed wait must not leave the engine training on the GPU
        sft = next(j for j in store.list_jobs(run_id) if j["stage"] == "sft")
        wait_for(lambda: store.metrics(job_id=sft["id"], names=["loss"]), timeout=300, what="SFT to log a step")
        pid = store.get_job(sft["id"])["pid"]
        wait_for(lambda: pid in pids_on_gpu(), timeout=60, what=f"NVML to list the SFT job's pid {pid} on cuda:0")
        wait_for(lambda: any("gpu0_mem_used_gb" in row["sample"] for row in store.telemetry(run_id=run_id)),
                 timeout=60, what="the engine to record the run's GPU telemetry")

        assert launch(["--workdir", str(workdir), "cancel", run_id]).returncode == 0
        wait_for(lambda: store.get_job(sft["id"])["status"] == "cancelled", timeout=90, what="the job to be cancelled")
        job = store.get_job(sft["id"])
        print(job["message"])
        assert job["message"].startswith("GPU memory released"), job["message"]
        assert pid not in pids_on_gpu()
        samples = [row["sample"] for row in store.telemetry(run_id=run_id) if "gpu0_mem_used_gb" in row["sample"]]
        assert any(s["gpu0_mem_used_gb"] and s["gpu0_mem_used_gb"] > 0 for s in samples)
    finally:
        stop_engines(store)
