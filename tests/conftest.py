"""Test-wide settings: offline Hugging Face libraries (nothing can be downloaded here; without this they retry
for ~45 s), two CPU threads like CI, and a per-test workspace."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # see engine/__init__.py: spinning OpenMP threads stall shared CPUs

import pytest  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh workspace; QAT_STUDIO_HOME points at it so child processes agree."""
    path = tmp_path / "workspace"
    path.mkdir()
    monkeypatch.setenv("QAT_STUDIO_HOME", str(path))
    return path


REPO = Path(__file__).resolve().parent.parent
SMALL_DEMO_ROWS = 300  # per task: 600 rows; tokenizing embedded:demo's 11,760 took ~12 s in every SFT/QAT job
SMALL_DEMO_FLAGS = ("--data.eval_fraction", "0.1")  # 30 eval rows per task: more than the smoke recipe shows (12)


@pytest.fixture(scope="session")
def shared_cache():
    """One model cache for every test that pre-trains the embedded base (the recipe tests, the browser and serving
    tests): pre-trained once (bf16 base ~32 s, its MXFP4 release ~17 s on 2 cores), deterministic, so safe to share.
    It lives in test-artifacts/cache/ (git-ignored), so local re-runs skip it too; a clean clone (CI) builds it once.
    `rm -rf test-artifacts/cache` gives the cold start again."""
    path = REPO / "test-artifacts" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def small_demo_data(tmp_path_factory) -> tuple[str, ...]:
    """`launch.py run` flags for a small slice of the embedded demo data (both tasks, `task`/`reference` kept): for the
    tests of the engine's mechanics (kill, cancel, resume, chaining), which train a handful of steps and need no
    10k-row dataset tokenized by every training job."""
    rows = []
    for task in ("language", "refusal"):
        with open(REPO / "assets" / "datasets" / f"{task}.jsonl") as f:
            rows += [json.loads(next(f)) for _ in range(SMALL_DEMO_ROWS)]
    random.Random(0).shuffle(rows)
    path = tmp_path_factory.mktemp("data") / "demo-small.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ("--data.source", str(path), *SMALL_DEMO_FLAGS)


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, shared_cache, small_demo_data):
    """The smoke recipe run end to end, with its SFT job killed mid-way and resumed (slow: shared by tests)."""
    from tests.helpers import run_killed_and_resumed, stop_engines

    old = os.environ.get("QAT_STUDIO_CACHE")
    os.environ["QAT_STUDIO_CACHE"] = str(shared_cache)
    workdir = tmp_path_factory.mktemp("resumed") / "ws"
    try:
        yield run_killed_and_resumed(workdir, small_demo_data)
    finally:  # also when the run failed: no engine outlives the tests
        if (workdir / "studio.db").exists():
            from storage import Store

            stop_engines(Store(workdir / "studio.db"))
        if old is None:
            os.environ.pop("QAT_STUDIO_CACHE", None)
        else:
            os.environ["QAT_STUDIO_CACHE"] = old


class _NotSupported(Exception):
    pass


def _fake_pynvml(pid: int) -> SimpleNamespace:
    """pynvml's calls as a driver answers them: plain ints (milliwatts, bytes, MHz), a reading that raises. No NVIDIA
    driver exists on CI; tests/test_gpu_jobs.py reads a real one on the device machine. This fake keeps what the real
    one found (the GPU count scaled into a float broke every GPU sample and the hardware panel) from coming back."""
    def unsupported(handle):
        raise _NotSupported

    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda index: f"handle{index}",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=20 * 2**30, total=80 * 2**30, free=60 * 2**30),
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetPowerUsage=lambda h: 350_500, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        NVML_TEMPERATURE_GPU=0, nvmlDeviceGetTemperature=lambda h, sensor: 51,
        NVML_CLOCK_SM=1, nvmlDeviceGetClockInfo=lambda h, clock: 1980, nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=pid, usedGpuMemory=3 * 2**30)],
        nvmlDeviceGetGraphicsRunningProcesses=unsupported,
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """One NVIDIA H100 as NVML reports it, used by this process (3 GiB)."""
    from engine.runtime import telemetry

    monkeypatch.setattr(telemetry, "_nvml_state", {"ready": True, "module": _fake_pynvml(os.getpid()), "note": None})
