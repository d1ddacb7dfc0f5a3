"""Schema history. Each entry of MIGRATIONS moves the database up one version; PRAGMA user_version records where a
file stands.

Rules for editing this file: never change a migration that has shipped (existing workspaces already ran it); add a
new function at the end instead. Each one runs in its own transaction together with the user_version bump, so a
crash mid-migration leaves the file at the previous version, never half-upgraded.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database
from sqlite_utils.db import ForeignKey


def _fk(table: str, column: str, other: str, on_delete: str) -> ForeignKey:
    return ForeignKey(table, column, other, "id", on_delete=on_delete)


def v1_core(db: Database) -> None:
    """runs, jobs, metrics, evals, eval_examples, artifacts."""
    db["runs"].create(
        {"id": str, "name": str, "recipe_json": str, "status": str, "run_dir": str,
         "created_at": float, "started_at": float, "ended_at": float, "error": str},
        pk="id", not_null={"name", "recipe_json", "status", "created_at"},
        defaults={"recipe_json": "{}", "status": "queued"},
    )
    db["runs"].create_index(["created_at"])

    db["jobs"].create(
        {"id": int, "run_id": str, "stage": str, "fmt": str, "target": str, "config_json": str,
         "depends_on_json": str, "resources": str, "status": str, "pid": int, "attempt": int, "log_path": str,
         "created_at": float, "started_at": float, "ended_at": float, "error": str, "error_detail": str,
         "progress": float, "message": str},
        pk="id", foreign_keys=[_fk("jobs", "run_id", "runs", "CASCADE")],
        not_null={"run_id", "stage", "fmt", "config_json", "depends_on_json", "resources", "status", "attempt",
                  "created_at"},
        defaults={"fmt": "bf16", "config_json": "{}", "depends_on_json": "[]", "resources": "cpu",
                  "status": "queued", "attempt": 0},
    )
    db["jobs"].create_index(["status", "id"])  # claim_job scans queued jobs in id order
    db["jobs"].create_index(["run_id", "id"])

    # Raw DDL because sqlite-utils' create() has no public AUTOINCREMENT option, and we need it: the UI polls
    # metrics(since_id=last seen id). A resume deletes the newest rows (delete_metrics_after); without AUTOINCREMENT
    # SQLite would hand those ids out again and the UI would never see the re-logged rows.
    db.execute(
        """CREATE TABLE "metrics" (
           "id" INTEGER PRIMARY KEY AUTOINCREMENT,
           "run_id" TEXT NOT NULL,
           "job_id" INTEGER NOT NULL REFERENCES "jobs"("id") ON DELETE CASCADE,
           "step" INTEGER NOT NULL,
           "name" TEXT NOT NULL,
           "value" REAL,
           "time" REAL NOT NULL
        )"""
    )
    db["metrics"].create_index(["job_id", "name", "step"])
    db["metrics"].create_index(["run_id", "job_id", "step"])

    db["evals"].create(
        {"id": int, "run_id": str, "job_id": int, "stage": str, "fmt": str, "metrics_json": str,
         "created_at": float},
        pk="id", foreign_keys=[_fk("evals", "run_id", "runs", "CASCADE")],
        not_null={"run_id", "stage", "fmt", "metrics_json", "created_at"},
    )
    db["evals"].create_index(["run_id", "stage", "fmt"], unique=True)  # put_eval upserts on this

    db["eval_examples"].create(
        {"id": int, "run_id": str, "job_id": int, "stage": str, "fmt": str, "task": str, "idx": int,
         "prompt": str, "reference": str, "completion": str, "passed": int, "detail_json": str},
        pk="id", foreign_keys=[_fk("eval_examples", "run_id", "runs", "CASCADE")],
        not_null={"run_id", "stage", "fmt"},
    )
    db["eval_examples"].create_index(["run_id", "stage", "fmt", "task", "idx"])

    db["artifacts"].create(
        {"id": int, "run_id": str, "job_id": int, "kind": str, "path": str, "sha256": str, "bytes": int,
         "meta_json": str, "created_at": float},
        pk="id", foreign_keys=[_fk("artifacts", "run_id", "runs", "CASCADE")],
        not_null={"run_id", "kind", "path", "meta_json", "created_at"}, defaults={"meta_json": "{}"},
    )
    db["artifacts"].create_index(["run_id", "kind"])


def v2_operations(db: Database) -> None:
    """telemetry (GPU/CPU samples), engines (liveness by heartbeat), servers (model serving processes)."""
    db["telemetry"].create(
        {"id": int, "run_id": str, "time": float, "sample_json": str},
        pk="id", foreign_keys=[_fk("telemetry", "run_id", "runs", "SET NULL")],
        not_null={"time", "sample_json"},
    )
    db["telemetry"].create_index(["time"])
    db["telemetry"].create_index(["run_id", "time"])

    db["engines"].create(
        {"id": int, "pid": int, "host": str, "started_at": float, "heartbeat_at": float, "stopped_at": float,
         "status": str},
        pk="id", not_null={"pid", "host", "started_at", "heartbeat_at", "status"}, defaults={"status": "running"},
    )
    db["engines"].create_index(["status", "heartbeat_at"])

    # A server outlives a deleted run (it may still be serving that model), so its run_id is only nulled.
    db["servers"].create(
        {"id": int, "run_id": str, "model_path": str, "backend": str, "host": str, "port": int, "pid": int,
         "command": str, "status": str, "started_at": float, "stopped_at": float, "log_path": str},
        pk="id", foreign_keys=[_fk("servers", "run_id", "runs", "SET NULL")],
        not_null={"status"}, defaults={"status": "starting"},
    )
    db["servers"].create_index(["status"])


def v3_process_identity(db: Database) -> None:
    """jobs.pid_started_at (the start time of the process behind jobs.pid: a pid alone may be reused after a reboot),
    jobs.ranks_json (the [pid, start time] of every rank of a multi-process job: torchrun starts each rank in its own
    session, out of reach of the launcher's process group), apps (the web app's heartbeat: an engine started by the
    app exits once idle and no app has been seen for a while)."""
    db["jobs"].add_column("pid_started_at", float)
    db["jobs"].add_column("ranks_json", str)
    db["apps"].create({"id": int, "pid": int, "host": str, "started_at": float, "heartbeat_at": float}, pk="id",
                      not_null={"pid", "started_at", "heartbeat_at"})
    db["apps"].create_index(["heartbeat_at"])


def v4_job_timing(db: Database) -> None:
    """jobs.timing_json: where a job's time went (engine/runtime/job_timing.py): start + imports, load, compute,
    save seconds, peak GPU memory, disk written. NULL for jobs that ran before this version."""
    db["jobs"].add_column("timing_json", str)


# Index i holds the migration to version i + 1.
MIGRATIONS: list[Callable[[Database], None]] = [v1_core, v2_operations, v3_process_identity, v4_job_timing]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: Database, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the missing migrations up to `target`; return the versions applied by this call.

    BEGIN IMMEDIATE takes the write lock before reading user_version, so when several processes open a fresh
    workspace at once, exactly one applies each step and the others see it done and skip it.
    """
    applied = []
    for version in range(1, target + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) >= version:
                db.execute("ROLLBACK")
                continue
            MIGRATIONS[version - 1](db)
            db.execute(f"PRAGMA user_version = {int(version)}")  # PRAGMA takes no bound parameters
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        applied.append(version)
    return applied
