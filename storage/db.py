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
from collections.abc import Iterator
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
from .queue import JobQueue
from .services import ServiceRows


class Store(JobQueue, ServiceRows):
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
