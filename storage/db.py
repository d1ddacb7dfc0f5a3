"""Store: the only door to a workspace's SQLite file.

Several processes share the file (engine, stage children writing metrics, the web UI polling every 1-2 s, CLI
commands); each makes its own Store. WAL lets readers run while one process writes; every write transaction starts
with BEGIN IMMEDIATE (see _write) and waits up to 30 s for the lock instead of failing.

Conventions: times are time.time() floats. JSON columns are stored as `<name>_json` text and appear in rows under
`<name>` already decoded (runs.recipe, jobs.config, jobs.depends_on, evals.metrics, eval_examples.detail,
artifacts.meta, telemetry.sample); callers pass them the same way. Metric values that are not finite (NaN, inf:
e.g. a diverged loss) are stored as NULL, so every reader gets plain JSON-safe numbers or None.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from .hashing import sha256_path, size_of_path
from .migrations import SCHEMA_VERSION, migrate, schema_version
from .rules import (  # noqa: F401 - StorageError, derive_run_status and the statuses are part of the API
    BLOCKING_DEP,
    JOB_TERMINAL,
    JSON_FIELDS,
    RUN_TERMINAL,
    REDACTED_FIELDS,
    STATUS_FIELD,
    StorageError,
    _finite_or_none,
    _one_line,
    _resources,
    derive_run_status,
    new_run_id,
    redact_secrets,
    refuse_secrets,
)
from .services import ServiceRows


class Store(ServiceRows):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per Store, shared by the threads of this process (Gradio runs handlers on a thread pool).
        # A sqlite3 connection is not safe for concurrent use (a single transaction state, interleaved cursors), so
        # every use holds self._lock. It is an RLock because public methods call each other while holding it.
        self._lock = threading.RLock()
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)  # timeout = busy_timeout 30 s
        self.db = Database(conn, execute_plugins=False)
        self._columns: dict[str, set[str]] = {}
        try:
            self._open()
        except BaseException:
            conn.close()
            raise

    def _open(self) -> None:
        self.db.execute("PRAGMA foreign_keys = ON")  # per connection; needed for ON DELETE CASCADE / SET NULL
        found = schema_version(self.db)
        if found > SCHEMA_VERSION:  # checked before WAL/migrations so we never touch a newer file
            raise StorageError(
                f"{self.path} has schema version {found}, but this code knows only up to {SCHEMA_VERSION}: it was "
                "written by a newer gpt-oss QAT Studio. Upgrade this installation, or use another workspace."
            )
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a power cut may lose the last commits only
        migrate(self.db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction, BEGIN IMMEDIATE. A deferred transaction that reads and then writes fails at once
        with SQLITE_BUSY (busy_timeout does not help) when another process committed in between; taking the write
        lock up front makes it wait its turn instead. sqlite-utils calls inside nest as savepoints. Re-entrant."""
        with self._lock:
            if self.db.conn.in_transaction:
                yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.rollback()
                raise

    def _select(self, table: str, where: list[str], params: list, order_by: str, limit: int | None = None) -> list:
        with self._lock:
            rows = self.db[table].rows_where(" AND ".join(where) or None, params, order_by=order_by, limit=limit)
            return [self._decode(table, row) for row in rows]

    @staticmethod
    def _where(**equal: Any) -> tuple[list[str], list]:
        """WHERE parts for the filters that are set: a value means '=', a list means 'IN'."""
        where, params = [], []
        for column, value in equal.items():
            if isinstance(value, (list, tuple, set, frozenset)):
                where.append(f"{column} IN ({','.join('?' * len(value))})")
                params.extend(value)
            elif value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        return where, params

    def _get(self, table: str, pk: Any) -> dict | None:
        found = self._select(table, ["id = ?"], [pk], "id")
        return found[0] if found else None

    def _decode(self, table: str, row: dict) -> dict:
        for name in JSON_FIELDS.get(table, ()):
            raw = row.pop(f"{name}_json", None)
            row[name] = None if raw is None else json.loads(raw)
        return row

    def _encode(self, table: str, fields: dict) -> dict:
        """Check field names and values, and JSON-encode the JSON fields: the row to write."""
        fields = {k: redact_secrets(v) if k in REDACTED_FIELDS and isinstance(v, str) else v for k, v in fields.items()}
        refuse_secrets(fields, table)  # every table: any row may carry a value copied from user input
        if "status" in fields and table in STATUS_FIELD and fields["status"] not in STATUS_FIELD[table]:
            raise StorageError(f"{table}.status {fields['status']!r} is not one of {sorted(STATUS_FIELD[table])}")
        row = dict(fields)
        for name in JSON_FIELDS.get(table, ()):
            if f"{name}_json" in row:
                raise StorageError(f"pass {table}.{name} as a dict or list, not {name}_json")
            if name in row:
                try:
                    row[f"{name}_json"] = json.dumps(row.pop(name))
                except (TypeError, ValueError) as exc:
                    raise StorageError(f"{table}.{name} is not JSON-serialisable: {exc}") from exc
        if table not in self._columns:
            with self._lock:
                self._columns[table] = set(self.db[table].columns_dict)
        unknown = set(row) - self._columns[table]
        if unknown:
            raise StorageError(f"{table} has no column(s) {sorted(unknown)}")
        return row

    def _insert(self, table: str, fields: dict) -> Any:
        row = self._encode(table, fields)
        with self._write() as db:
            return db[table].insert(row).last_pk

    def _update(self, table: str, pk: Any, fields: dict) -> None:
        row = self._encode(table, fields)
        if not row:
            return
        with self._write() as db:
            try:
                db[table].update(pk, row)
            except NotFoundError as exc:
                raise StorageError(f"no {table} row with id {pk!r}") from exc

    # ---- runs -----------------------------------------------------------------------------------------------------

    def create_run(self, name: str, recipe: dict, run_dir: str | None = None, run_id: str | None = None) -> str:
        for _attempt in range(5):
            candidate = run_id or new_run_id()
            try:
                self._insert("runs", {"id": candidate, "name": name, "recipe": recipe, "run_dir": run_dir,
                                      "status": "queued", "created_at": time.time()})
                return candidate
            except sqlite3.IntegrityError as exc:
                if run_id is not None:
                    raise StorageError(f"run {run_id} already exists") from exc
        raise StorageError("could not find a free run id")  # 5 clashes of 4 random hex in one second: not expected

    def get_run(self, run_id: str) -> dict | None:
        return self._get("runs", run_id)

    def list_runs(self, limit: int = 200) -> list[dict]:
        return self._select("runs", [], [], "created_at DESC, id DESC", limit)

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._update("runs", run_id, fields)

    def delete_run(self, run_id: str) -> None:
        with self._write() as db:
            db["runs"].delete_where("id = ?", [run_id])  # jobs, metrics, evals, examples, artifacts cascade

    def refresh_run_status(self, run_id: str) -> str:
        """Derive the run's status from its jobs: running if any job runs; failed if any failed; while jobs wait,
        queued (none started yet) or running; then interrupted, cancelled; succeeded when all succeeded. Sets
        started_at on first running, ended_at on entering a terminal status (cleared when it leaves one)."""
        with self._write() as db:
            run = self.get_run(run_id)
            if run is None:
                raise StorageError(f"no run {run_id}")
            jobs = [row[0] for row in db.execute("SELECT status FROM jobs WHERE run_id = ?", [run_id])]
            status = derive_run_status(jobs, run["status"])
            now = time.time()
            fields: dict[str, Any] = {"status": status}
            if status == "running" and run["started_at"] is None:
                fields["started_at"] = now
            if status not in RUN_TERMINAL:
                fields["ended_at"] = None
            elif run["status"] != status or run["ended_at"] is None:
                fields["ended_at"] = now
            self.update_run(run_id, **fields)
            return status

    # ---- jobs -----------------------------------------------------------------------------------------------------

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
                                                  "pid_started_at": None, "ranks_json": None})
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
                                       "ranks_json": None, "log_path": log_path})
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
                                               "ranks_json": None, "started_at": None,
                                               "ended_at": None, "error": None, "error_detail": None})
            self._refresh_runs_of(requeue)

    # ---- metrics --------------------------------------------------------------------------------------------------

    def log_metrics(self, job_id: int, step: int, values: dict[str, float], time: float | None = None) -> None:
        """One row per name, all in one transaction. Non-finite values (NaN, inf) are stored as NULL."""
        stamp = _now() if time is None else time
        with self._write() as db:
            job = db.execute("SELECT run_id FROM jobs WHERE id = ?", [job_id]).fetchone()
            if job is None:
                raise StorageError(f"no job {job_id}")
            refuse_secrets([str(name) for name in values], "metrics.name")
            rows = [{"run_id": job[0], "job_id": job_id, "step": int(step), "name": str(name),
                     "value": _finite_or_none(name, value), "time": stamp} for name, value in values.items()]
            db["metrics"].insert_all(rows)

    def delete_metrics_after(self, job_id: int, step: int) -> int:
        with self._write() as db:
            # Raw SQL for the row count, which sqlite-utils' delete_where does not return.
            return db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", [job_id, step]).rowcount

    def metrics(self, run_id: str | None = None, job_id: int | None = None, names: list[str] | None = None,
                since_id: int = 0) -> list[dict]:
        """Rows ordered by job, step. since_id: only rows with a larger id (ids never repeat, see migrations)."""
        where, params = self._where(run_id=run_id, job_id=job_id, name=None if names is None else list(names))
        return self._select("metrics", ["id > ?", *where], [since_id, *params], "job_id, step, id")

    # ---- evals ----------------------------------------------------------------------------------------------------

    def put_eval(self, run_id: str, job_id: int | None, stage: str, fmt: str, metrics: dict) -> None:
        row = self._encode("evals", {"run_id": run_id, "job_id": job_id, "stage": stage, "fmt": fmt,
                                     "metrics": metrics, "created_at": time.time()})
        with self._write() as db:
            # pk= names the UNIQUE(run_id, stage, fmt) index, which becomes the ON CONFLICT target of the upsert.
            db["evals"].upsert(row, pk=("run_id", "stage", "fmt"))

    def evals(self, run_id: str) -> list[dict]:
        return self._select("evals", ["run_id = ?"], [run_id], "id")

    def add_eval_examples(self, rows: list[dict]) -> None:
        encoded = [self._encode("eval_examples", {**row, "passed": None if row.get("passed") is None
                                                  else int(bool(row["passed"]))}) for row in rows]
        with self._write() as db:
            db["eval_examples"].insert_all(encoded)

    def eval_examples(self, run_id: str, stage: str | None = None, fmt: str | None = None, task: str | None = None,
                      limit: int | None = None) -> list[dict]:
        where, params = self._where(run_id=run_id, stage=stage, fmt=fmt, task=task)
        return self._select("eval_examples", where, params, "stage, fmt, task, idx, id", limit)

    # ---- artifacts ------------------------------------------------------------------------------------------------

    def add_artifact(self, run_id: str, job_id: int | None, kind: str, path: str, sha256: str | None = None,
                     meta: dict | None = None) -> int:
        """Hashes the file or directory when sha256 is not given; that happens before taking any lock, since a
        checkpoint can take minutes to hash."""
        try:
            digest, size = sha256_path(path) if sha256 is None else (sha256, size_of_path(path))
        except FileNotFoundError as exc:
            raise StorageError(str(exc)) from exc
        return self._insert("artifacts", {"run_id": run_id, "job_id": job_id, "kind": kind, "path": str(path),
                                          "sha256": digest, "bytes": size, "meta": meta or {},
                                          "created_at": time.time()})

    def artifacts(self, run_id: str | None = None, kind: str | None = None) -> list[dict]:
        return self._select("artifacts", *self._where(run_id=run_id, kind=kind), "id")


def _now() -> float:
    # Module-level so methods whose `time` parameter shadows the module can still read the clock.
    return time.time()
