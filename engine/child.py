"""One job, in its own process: `python -m engine.child --workdir W --job N`.

The engine starts this with stdout/stderr going to the job's log file. The stage's outcome is written to storage
here (succeeded, or failed with the error, relevant log lines and advice); if this process dies without writing
(SIGKILL, OOM killer), the engine records what happened from the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from engine import advice, workspace
from engine.configs import Recipe
from engine.context import Context, pick_device
from storage import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--job", type=int, required=True)
    args = parser.parse_args(argv)

    workdir = workspace.resolve_workdir(args.workdir)
    workspace.setup_extension_cache(workdir)
    store = Store(workspace.db_path(workdir))
    job = store.get_job(args.job)
    if job is None:
        print(f"job {args.job} not found in {store.path}", file=sys.stderr)
        return 2
    run = store.get_run(job["run_id"])
    started = time.time()
    print(f"== job {job['id']} {job['config'].get('key', job['stage'])} (run {run['id']}, pid {os.getpid()}) ==",
          flush=True)
    try:
        recipe = Recipe.model_validate(run["recipe"])
        ctx = Context(store, workdir, run, job, recipe, pick_device(recipe, job["resources"]))
        from engine.stages import stage_function

        result = stage_function(job["stage"])(ctx) or {}
        store.update_job(job["id"], progress=1.0, message=_summary(result))
        store.finish_job(job["id"], "succeeded")
        print(f"== done in {time.time() - started:.1f} s: {json.dumps(result, default=str)[:2000]}", flush=True)
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the UI, KeyboardInterrupt included
        detail = traceback.format_exc()
        print(detail, file=sys.stderr, flush=True)
        message = advice.explain(exc, detail)
        store.finish_job(job["id"], "failed", error=message, error_detail=detail[-6000:])
        return 1
    finally:
        store.refresh_run_status(job["run_id"])


def _summary(result: dict) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
             if isinstance(v, (int, float, str)) and len(str(v)) < 80]
    return ", ".join(parts[:6])


if __name__ == "__main__":
    sys.exit(main())
