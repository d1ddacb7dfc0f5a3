"""Is this job (or engine) really still running? The one answer used by `status`, `resume` and the engine's recovery.

A pid alone does not say: after a power cut the job row still reads 'running' with a pid that is dead, or - after a
reboot - taken by some unrelated process. So every process we track is recorded with its start time (psutil's
create_time, fixed for a process's life) and counts as ours only while a live process has that pid *and* that start
time. Killing goes by the same record, so a reused pid is never signalled.

A job's processes: the one the engine started (jobs.pid; a process that chains into the next jobs of its run carries
its pid into each running job row) and, for a multi-process job, every rank (jobs.ranks, written by the ranks
themselves): torchrun starts each rank in a session of its own, out of reach of the launcher's process group.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

START_TIME_TOLERANCE_S = 0.5  # create_time comes from jiffies since boot: two reads agree to ~0.01 s
LEGACY_START_SLACK_S = 60.0  # rows written before start times were recorded: the process started near the claim


def start_time(pid: int | None) -> float | None:
    """The start time of live process `pid` (None if there is none, or it is a zombie: dead, not yet reaped)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int | None, started_at: float | None, not_after: float | None = None) -> bool:
    """A live process with this pid that is the one recorded: same start time, or - when no start time was recorded
    - one that started no later than `not_after` (a later one took a recycled pid)."""
    now_started = start_time(pid)
    if now_started is None:
        return False
    if started_at is not None:
        return abs(now_started - started_at) <= START_TIME_TOLERANCE_S
    return not_after is None or now_started <= not_after


def pid_alive(pid: int | None) -> bool:
    return start_time(pid) is not None


def job_pids(job: dict) -> list[int]:
    """The job's processes that are still the ones recorded: its process (launcher) and its ranks."""
    found = []
    legacy_bound = (job.get("started_at") or 0.0) + LEGACY_START_SLACK_S
    if job.get("pid") and is_same_process(job["pid"], job.get("pid_started_at"), legacy_bound):
        found.append(job["pid"])
    for pid, started in job.get("ranks") or []:
        if pid not in found and is_same_process(pid, started):
            found.append(pid)
    return found


def job_alive(job: dict) -> bool:
    """Is anything of this job still running?"""
    return bool(job_pids(job))


def kill_job(job: dict, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process of the job: the launcher's process group, and each rank's (a rank leads its own session,
    its group holds its dataloader workers). Only processes that are still the recorded ones; returns their pids."""
    pids = job_pids(job)
    for pid in pids:
        kill_group(pid, sig)
    return pids


def kill_group(pid: int, sig: int) -> None:
    """Signal process group `pid` (a process started with start_new_session, or a rank torchrun made a session
    leader, leads a group with its own pid); a process that leads no group is signalled alone."""
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_pids(pgid: int) -> set[int]:
    """Every process of a process group (e.g. a launcher and the agent under it)."""
    pids = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid:
                pids.add(proc.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def engine_alive(engine: dict, max_age_s: float = 10.0) -> bool:
    """An engine row whose heartbeat is fresh and whose process is the one that registered (it registered after it
    started, so its process cannot have started later)."""
    return (engine["status"] == "running" and engine["heartbeat_at"] >= time.time() - max_age_s
            and is_same_process(engine["pid"], None, not_after=engine["started_at"] + START_TIME_TOLERANCE_S))


def live_engine(store, exclude_pid: int | None = None) -> dict | None:
    return next((e for e in store.live_engines() if e["pid"] != exclude_pid and engine_alive(e)), None)


def settle_dead_jobs(store, kill_live: bool = False) -> list[int]:
    """Jobs left 'running' or 'cancelling' with no engine to follow them (engine killed, power cut, reboot): those
    whose processes are gone become 'interrupted' (a cancelling one 'cancelled'); with `kill_live` (the engine
    taking over at start) the live ones are killed first and marked too. Also marks dead engine rows.

    Call only when no live engine runs (see live_engine), or it would take that engine's jobs. Returns the job ids
    it marked."""
    for engine in store.running_engines():
        if not engine_alive(engine, max_age_s=float("inf")):
            store.mark_engine_dead(engine["id"])
    marked = []
    for job in store.list_jobs(status=("running", "cancelling")):
        if job_alive(job):
            if not kill_live:
                continue  # still running by itself (its engine died, it did not): it records its own outcome
            kill_job(job, signal.SIGKILL)
        if job["status"] == "cancelling":
            store.finish_job(job["id"], "cancelled", error="cancelled while the engine was down")
        else:
            store.finish_job(job["id"], "interrupted",
                             error="the engine stopped while this job was running; resume it")
        marked.append(job["id"])
    return marked
