"""What a stage gets besides its config: storage handles, paths, device, logging. No globals."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.runtime import workspace
from engine.runtime.job_timing import JobTiming
from engine.recipe.configs import Recipe
from storage import Store


@dataclass
class Context:
    store: Store
    workdir: Path
    run: dict
    job: dict
    recipe: Recipe
    device: torch.device
    # Models this job process has loaded, by job key ('sft', 'ptq:mxfp4', ...), kept for the next job of a chain
    # (engine/stages/job.py runs several jobs of a run in one process). At most one entry: see stages/common.py.
    models: dict = field(default_factory=dict)
    timing: JobTiming | None = None  # set by the job process (engine/stages/job.py); None when a test calls a stage

    def phase(self, name: str):
        """`with ctx.phase("load"):` / `"save"`: counted apart from compute in the job's timing."""
        return self.timing.phase(name) if self.timing is not None else contextlib.nullcontext()

    @property
    def run_id(self) -> str:
        return self.run["id"]

    @property
    def job_id(self) -> int:
        return self.job["id"]

    @property
    def run_dir(self) -> Path:
        return Path(self.run["run_dir"])

    @property
    def cache_dir(self) -> Path:
        return workspace.cache_dir(self.workdir)

    @property
    def dtype(self) -> torch.dtype:
        choice = self.recipe.model.dtype
        if choice == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, choice)

    def model_dir(self, key: str) -> Path:
        """Output dir of the stage with job key `key` ('sft', 'ptq:mxfp4', ...)."""
        stage, _, fmt = key.partition(":")
        return workspace.model_dir(self.run_dir, stage, fmt or None)

    def log(self, message: str) -> None:
        """To the job's log file (our stdout); the UI shows its tail."""
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
        sys.stdout.flush()

    def progress(self, fraction: float, message: str | None = None) -> None:
        fields: dict = {"progress": max(0.0, min(1.0, float(fraction)))}
        if message is not None:
            fields["message"] = message
            self.log(message)
        self.store.update_job(self.job_id, **fields)

    def metrics(self, step: int, **values: float) -> None:
        self.store.log_metrics(self.job_id, step, values)


def pick_device(recipe: Recipe, resources: str) -> torch.device:
    if resources.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this job was queued for a CUDA GPU, but no GPU is visible to the engine")
        # The engine sets CUDA_VISIBLE_DEVICES to the job's GPUs, so the first visible one is ours.
        return torch.device("cuda:0")
    return torch.device("cpu")
