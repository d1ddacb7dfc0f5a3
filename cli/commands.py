"""Headless commands behind launch.py: run, resume, cancel, status. Same engine and stages as the app."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from engine.runtime import workspace
from engine.runs import UserError, load_and_validate, resume_note, resume_run, settle

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


def launcher() -> str:
    """How to call launch.py again, for the hints printed to the user: `python launch.py` in an activated venv, else
    the interpreter that runs now (it has the packages; a system python may not), e.g. `.venv/bin/python launch.py`."""
    if os.environ.get("VIRTUAL_ENV"):
        return "python launch.py"
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{python} launch.py"


def cmd_run(recipe_path: str, workdir: Path, overrides: dict, wait: bool = True) -> int:
    recipe = load_and_validate(recipe_path, overrides)
    from engine.runtime.pipeline import enqueue
    from engine.runtime.worker import ensure_engine
    from storage import Store

    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(workspace.db_path(workdir))
    run_id = enqueue(store, recipe, workdir)
    print(f"run {run_id} queued ({len(store.list_jobs(run_id))} jobs) in {workdir}", flush=True)
    ensure_engine(workdir, idle_exit=15.0)
    if not wait:
        return 0
    return watch(store, run_id)


def watch(store, run_id: str, poll_s: float = 0.25) -> int:
    """Print each job's progress until the run ends; Ctrl-C stops watching, not the run."""
    seen: dict[int, tuple] = {}
    started = time.time()
    try:
        while True:
            for job in store.list_jobs(run_id):
                state = (job["status"], job.get("message"))
                if seen.get(job["id"]) != state:
                    seen[job["id"]] = state
                    msg = f" - {job['message']}" if job.get("message") else ""
                    err = f"\n    error: {job['error']}" if job.get("error") and job["status"] != "succeeded" else ""
                    print(f"[{time.time() - started:6.0f}s] {job['config']['key']:<22} {job['status']:<11}{msg}{err}",
                          flush=True)
            run = store.get_run(run_id)
            if run["status"] in TERMINAL and not store.list_jobs(run_id, status="queued"):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped watching; the run goes on in the engine. Follow it with: {launcher()} status {run_id}")
        return 130
    return finish(store, run_id, time.time() - started)


def finish(store, run_id: str, elapsed: float) -> int:
    from engine.evaluation.results import format_table, summary

    run = store.get_run(run_id)
    data = summary(store, run_id)
    print(f"\nrun {run_id} {run['status']} in {elapsed:.0f} s\n")
    print(format_table(data))
    path = Path(run["run_dir"]) / "summary.json"
    if path.exists():
        print(f"\nsummary: {path}")
    for fmt, export in data["exports"].items():
        print(f"export ({fmt}): {export}")
    failed = [j for j in store.list_jobs(run_id) if j["status"] in ("failed", "interrupted", "cancelled")]
    for job in failed:
        log = f"\n  log: {job['log_path']}" if job.get("log_path") else ""  # a job cancelled before it started has none
        print(f"\n{job['config']['key']} {job['status']}: {job['error']}{log}", file=sys.stderr)
    return 0 if run["status"] == "succeeded" else 1


def cmd_resume(run_id: str, workdir: Path, wait: bool = True) -> int:
    from engine.runtime.worker import ensure_engine

    store = _existing_store(workdir)
    if store.get_run(run_id) is None:
        raise UserError(f"no run {run_id} in {workdir}; list runs with: {launcher()} status")
    requeued = resume_run(store, run_id)
    if not requeued:
        print(f"run {run_id}: nothing to resume (no failed, interrupted or cancelled jobs)")
        return 0
    print(f"run {run_id}: re-queued jobs {requeued}")
    for job_id in requeued:
        job = store.get_job(job_id)
        print(f"  {job['config']['key']}: {resume_note(store, job)}")
    ensure_engine(workdir, idle_exit=15.0)
    return watch(store, run_id) if wait else 0


def cmd_cancel(run_id: str, workdir: Path) -> int:
    from engine.runtime.worker import request_cancel

    store = _existing_store(workdir)
    jobs = store.list_jobs(run_id)
    if not jobs:
        raise UserError(f"no run {run_id} in {workdir}")
    for job in jobs:
        if job["status"] in ("queued", "running"):
            print(f"{job['config']['key']}: {request_cancel(store, job['id'])}")
    return 0


def cmd_status(run_id: str | None, workdir: Path, as_json: bool = False) -> int:
    """The runs of a workspace, or one run: a header, its jobs and its results table. With as_json, JSON only."""
    store = _existing_store(workdir)
    settle(store)  # a job whose process died with its engine reads 'interrupted', not 'running' for ever
    if run_id is None:
        runs = store.list_runs()
        if as_json:
            print(json.dumps(runs, default=str, indent=1))
            return 0
        for run in runs:
            print(f"{run['id']}  {run['status']:<11} {run['name']}")
        return 0
    run = store.get_run(run_id)
    if run is None:
        raise UserError(f"no run {run_id} in {workdir}; list runs with: {launcher()} status")
    from engine.evaluation.results import format_table, summary
    from engine.runtime.job_timing import format_timing

    jobs, results = store.list_jobs(run_id), summary(store, run_id)
    if as_json:
        print(json.dumps({"run": run, "jobs": jobs, "results": results}, default=str, indent=1))
        return 0
    print(f"run {run['id']}  {run['name']}  {run['status']}")
    print(f"created {_when(run['created_at'])}   run dir: {run.get('run_dir') or '-'}")
    if run.get("error"):
        print(f"error: {run['error']}")
    print()
    for job in jobs:
        print(f"{job['id']:>4} {job['config']['key']:<22} {job['status']:<11} {job.get('message') or ''}")
        if job.get("timing"):
            print(f"{'':>5}{format_timing(job['timing'])}")
    print()
    print(format_table(results))
    return 0


def cmd_stop(workdir: Path) -> int:
    """Stop the workspace's engine: its running jobs become 'interrupted' (resume them later)."""
    from engine.runtime.worker import stop_engine

    store = _existing_store(workdir)
    running = [j["id"] for j in store.list_jobs(status=("running", "cancelling"))]
    try:
        stopped = stop_engine(workdir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not stopped:
        print(f"no engine running on {workdir}")
    else:
        print(f"stopped engine pid {', '.join(map(str, stopped))} on {workdir}")
    for job_id in running:
        job = store.get_job(job_id)
        print(f"  job {job_id} {job['config']['key']}: {job['status']} (resume with: .venv/bin/python launch.py resume "
              f"{job['run_id']})")
    return 0


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _existing_store(workdir: Path):
    from storage import Store

    db = workspace.db_path(workdir)
    if not db.exists():
        raise UserError(f"no workspace at {workdir} (no {db.name}); pass --workdir or set QAT_STUDIO_HOME")
    return Store(db)
