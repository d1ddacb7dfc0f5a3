"""The job queue (a mixin of Store): jobs and their dependencies, atomic claims, finishes, skips, requeues.

The engine's worker claims jobs here, a job process chains into the next one of its run here, and cancel, resume
and recovery change job states here. Uses Store's plumbing (_insert, _update, _select, _where, _write, _get).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from sqlite_utils import Database

from .rules import BLOCKING_DEP, JOB_TERMINAL, StorageError, _one_line, _resources


class JobQueue:
    def add_job(self, run_id: str, stage: str, fmt: str = "bf16", target: str | None = None,
                config: dict | None = None, depends_on: Iterable[int] = (), resources: str = "cpu") -> int:
        deps = [int(dep) for dep in depends_on]
        with self._write() as db:
            known = set(self._job_statuses(db, deps))
            if set(deps) - known:  # deps must exist already, which also rules out cycles
                raise StorageError(f"job dependencies {sorted(set(deps) - known)} do not exist")
            return self._insert("jobs", {
                "run_id": run_id, "stage": stage, "fmt": fmt, "target": target, "config": config or {},
                "depends_on": deps, "resources": resources, "status": "queued", "created_at": time.time()})

    def get_job(self, job_id: int) -> dict | None:
        return self._get("jobs", job_id)

    def list_jobs(self, run_id: str | None = None, status: str | Iterable[str] | None = None) -> list[dict]:
        wanted = None if status is None else [status] if isinstance(status, str) else list(status)
        where, params = self._where(run_id=run_id, status=wanted)
        return self._select("jobs", where, params, "id")

    def _job_statuses(self, db: Database, ids: Iterable[int]) -> dict[int, str]:
        where, params = self._where(id=list(set(ids)))
        return dict(db.execute(f"SELECT id, status FROM jobs WHERE {where[0]}", params).fetchall())

    def _skip_blocked(self, db: Database, now: float) -> list[int]:
        """Mark 'skipped' every queued job with a dependency that failed, was cancelled or skipped (repeating, so a
        skip travels down a chain of dependants)."""
        queued = {row["id"]: json.loads(row["depends_on_json"]) for row in
                  db.query("SELECT id, depends_on_json FROM jobs WHERE status = 'queued' ORDER BY id")}
        status = self._job_statuses(db, [dep for deps in queued.values() for dep in deps])
        status.update({job_id: "queued" for job_id in queued})
        skipped: dict[int, str] = {}
        changed = True
        while changed:
            changed = False
            for job_id, deps in queued.items():
                blocker = next((d for d in deps if status.get(d, "missing") in BLOCKING_DEP), None)
                if status[job_id] == "queued" and blocker is not None:
                    status[job_id] = "skipped"
                    skipped[job_id] = f"skipped: job {blocker} {status.get(blocker, 'missing')}"
                    changed = True
        for job_id, error in skipped.items():
            db["jobs"].update(job_id, {"status": "skipped", "error": error, "ended_at": now})
        return list(skipped)

    def _refresh_runs_of(self, job_ids: Iterable[int]) -> None:
        """Keep runs.status in step with job transitions, so the UI never shows a stale run status."""
        where, params = self._where(id=list(job_ids))
        for (run_id,) in self.db.execute(f"SELECT DISTINCT run_id FROM jobs WHERE {where[0]}", params).fetchall():
            self.refresh_run_status(run_id)

    def claim_job(self, busy_resources: Iterable[str] = frozenset(), pid: int | None = None) -> dict | None:
        """Atomically take the next runnable job: lowest id, queued, all dependencies succeeded, no resource in
        busy_resources. BEGIN IMMEDIATE serialises claimers across processes, so no job is handed out twice.
        Refreshes the status of the claimed job's run and of runs whose jobs it skipped."""
        busy = set(busy_resources)
        with self._write() as db:
            now = time.time()  # read under the lock, so a claim is never stamped before the finish it waited for
            self._refresh_runs_of(self._skip_blocked(db, now))
            queued = list(db.query("SELECT id, depends_on_json, resources, attempt FROM jobs "
                                   "WHERE status = 'queued' ORDER BY id"))
            status = self._job_statuses(db, [d for row in queued for d in json.loads(row["depends_on_json"])])
            for row in queued:
                deps_done = all(status.get(dep) == "succeeded" for dep in json.loads(row["depends_on_json"]))
                if deps_done and not (_resources(row["resources"]) & busy):
                    db["jobs"].update(row["id"], {"status": "running", "started_at": now, "ended_at": None,
                                                  "attempt": row["attempt"] + 1, "pid": pid,
                                                  "pid_started_at": None, "ranks_json": None,
                                                  "timing_json": None})
                    self._refresh_runs_of([row["id"]])
                    return self.get_job(row["id"])
        return None

    def ready_jobs(self, run_id: str, resources: str) -> list[dict]:
        """Queued jobs of one run, on exactly these resources, whose dependencies have all succeeded (a snapshot:
        claim one with claim_this_job, which checks again under the lock)."""
        jobs = self.list_jobs(run_id)
        status = {job["id"]: job["status"] for job in jobs}
        return [job for job in jobs if job["status"] == "queued" and job["resources"] == resources
                and all(status.get(dep) == "succeeded" for dep in job["depends_on"])]

    def claim_this_job(self, job_id: int, pid: int, log_path: str | None = None,
                       pid_started_at: float | None = None) -> dict | None:
        """Atomically take one given job if it is still queued with every dependency succeeded (a job process
        chaining into the next job of its run); None if someone else took it or it is not ready."""
        with self._write() as db:
            row = db.execute("SELECT status, depends_on_json, attempt FROM jobs WHERE id = ?", [job_id]).fetchone()
            if row is None or row[0] != "queued":
                return None
            deps = json.loads(row[1])
            if any(s != "succeeded" for s in self._job_statuses(db, deps).values()) or \
                    len(self._job_statuses(db, deps)) != len(set(deps)):
                return None
            db["jobs"].update(job_id, {"status": "running", "started_at": time.time(), "ended_at": None,
                                       "attempt": row[2] + 1, "pid": pid, "pid_started_at": pid_started_at,
                                       "ranks_json": None, "log_path": log_path, "timing_json": None})
            self._refresh_runs_of([job_id])
        return self.get_job(job_id)

    def register_rank(self, job_id: int, pid: int, started_at: float | None) -> None:
        """A rank of a multi-process job records its [pid, process start time] in jobs.ranks: torchrun starts each
        rank in its own session, so only this list lets the engine reach every rank on a hard kill."""
        with self._write():
            job = self.get_job(job_id)
            if job is None:
                raise StorageError(f"no job {job_id}")
            ranks = [r for r in (job["ranks"] or []) if r[0] != pid] + [[int(pid), started_at]]
            self.update_job(job_id, ranks=ranks)

    def update_job(self, job_id: int, **fields: Any) -> None:
        self._update("jobs", job_id, fields)

    def finish_job(self, job_id: int, status: str, error: str | None = None, error_detail: str | None = None) -> None:
        """End a job and refresh its run's status. `error` is kept to its first line; a longer error becomes
        error_detail if none is given."""
        if status not in JOB_TERMINAL:
            raise StorageError(f"finish_job status must be one of {sorted(JOB_TERMINAL)}, not {status!r}")
        if error_detail is None and error and _one_line(error) != error.strip():
            error_detail = error
        fields = {"status": status, "error": _one_line(error), "error_detail": error_detail}
        if status == "succeeded":
            fields["progress"] = 1.0
        with self._write():
            fields["ended_at"] = time.time()  # under the lock: dependants claimed later are stamped later
            self.update_job(job_id, **fields)
            self._refresh_runs_of([job_id])

    def requeue_job(self, job_id: int) -> None:
        """Put a job back in the queue (resume), with the dependants that were skipped because of it; refresh the
        run's status."""
        with self._write() as db:
            job = self.get_job(job_id)
            if job is None:
                raise StorageError(f"no job {job_id}")
            if job["status"] in ("running", "cancelling"):
                raise StorageError(f"job {job_id} is {job['status']}; stop it before requeueing")
            skipped = {row["id"]: set(json.loads(row["depends_on_json"])) for row in
                       db.query("SELECT id, depends_on_json FROM jobs WHERE status = 'skipped'")}
            requeue = {job_id}
            grew = True
            while grew:  # dependants of dependants too; one still blocked elsewhere is simply re-skipped at claim
                more = {skip_id for skip_id, deps in skipped.items() if deps & requeue} - requeue
                requeue |= more
                grew = bool(more)
            for requeue_id in sorted(requeue):
                db["jobs"].update(requeue_id, {"status": "queued", "pid": None, "pid_started_at": None,
                                               "ranks_json": None, "started_at": None, "timing_json": None,
                                               "ended_at": None, "error": None, "error_detail": None})
            self._refresh_runs_of(requeue)

