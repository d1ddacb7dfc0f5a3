"""Where a job's time went: process start + imports, model load, compute, save; peak GPU memory; disk written.

Users of a 20-minute run ask "where did the time go?". The job process (engine/stages/job.py) keeps one JobTiming
per job; stages mark their load and save phases through `ctx.phase("load" | "save")` (engine/runtime/context.py);
compute is the rest of the stage function. The result is stored with the job (jobs.timing) and shown by
`launch.py status` and the History tab.

  start_imports_s  from the process's start (or, for a job chained into a running process, from its claim) until the
                   stage function starts: interpreter, torch / transformers imports, the stage module's imports.
                   Imports done lazily inside a stage (trl, modelopt) count in the phase that triggers them.
  load_s           reading (and rebuilding: base + adapters + quantizers) the stage's input model.
  save_s           writing the stage's output (adapters, quantizers, a whole model, an export's files).
  compute_s        the stage function's time minus load and save: training, calibration, generation, verification.
  peak_gpu_gib     torch's peak reserved CUDA memory in this job (what the card had to hold); None without CUDA.
  disk_written_gib growth of the run directory over the job (checkpoints rotated away are not counted).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GIB = 1024**3
PHASES = ("load", "save")


def job_start_time(job: dict, chained: bool) -> float:
    """When this job's time began. The first job of a process: the process's start (the interpreter and the
    imports are that job's cost). A job chained into a process that already ran one (engine/stages/job.py
    claim_next_job): its claim, the `started_at` that storage stamped when this process took it, so what it waited
    for after the claim (the previous model released, its log opened) counts as its start."""
    if chained and job.get("started_at"):
        return float(job["started_at"])
    if chained:
        return time.time()
    from engine.runtime import processes

    return processes.start_time(os.getpid()) or time.time()


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # rotated away while we walk
                pass
    return total


class JobTiming:
    def __init__(self, started_at: float, run_dir: Path | None = None):
        self.started_at = started_at
        self.run_dir = run_dir
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.stage_started: float | None = None
        self.ended: float | None = None
        self.disk_before = directory_bytes(run_dir) if run_dir and run_dir.exists() else 0
        self._reset_gpu_peak()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; expected one of {', '.join(PHASES)}")
        begin = time.time()
        try:
            yield
        finally:
            self.seconds[name] += time.time() - begin

    def stage_begins(self) -> None:
        self.stage_started = time.time()

    def stage_ends(self) -> None:
        self.ended = time.time()

    def result(self) -> dict:
        end = self.ended or time.time()
        stage_start = self.stage_started or end
        stage_seconds = end - stage_start
        out = {
            "start_imports_s": round(stage_start - self.started_at, 2),
            "load_s": round(self.seconds["load"], 2),
            "compute_s": round(max(0.0, stage_seconds - self.seconds["load"] - self.seconds["save"]), 2),
            "save_s": round(self.seconds["save"], 2),
            "total_s": round(end - self.started_at, 2),
            **self._gpu_peaks_gib(),
        }
        if self.run_dir is not None and self.run_dir.exists():
            out["disk_written_gib"] = round(max(0, directory_bytes(self.run_dir) - self.disk_before) / GIB, 3)
        return out

    @staticmethod
    def _reset_gpu_peak() -> None:
        torch = sys.modules.get("torch")  # never import torch just to measure: a report job does not need it
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _gpu_peaks_gib() -> dict:
        """Peak GPU memory of this job: allocated (what its tensors, and models a chain keeps, needed: the number
        that says whether a card holds it) and reserved (torch's caching allocator; its cache carries over between
        chained jobs, so it overstates: 125.9 GiB reserved for a 20b evaluation on the H200, 2026-12-03)."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {"peak_gpu_gib": None}
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def format_timing(timing: dict | None) -> str:
    """One line for `status` and the History tab: 'start 12.1 s · load 40.2 s · compute 300.0 s · save 5.0 s ·
    peak GPU 61.3 GiB · disk +0.012 GiB'."""
    if not timing:
        return ""
    parts = [f"{label} {timing[key]:.1f} s" for key, label in
             (("start_imports_s", "start"), ("load_s", "load"), ("compute_s", "compute"), ("save_s", "save"))
             if timing.get(key) is not None]
    if timing.get("peak_gpu_gib") is not None:
        reserved = timing.get("peak_gpu_reserved_gib")
        parts.append(f"peak GPU {timing['peak_gpu_gib']:.1f} GiB"
                     + (f" (reserved {reserved:.1f})" if reserved is not None else ""))
    if timing.get("disk_written_gib") is not None:
        parts.append(f"disk +{timing['disk_written_gib']:.3f} GiB")
    return " · ".join(parts)
