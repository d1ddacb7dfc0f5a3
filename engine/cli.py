"""Headless commands behind launch.py: run, resume, cancel, status. Same engine and stages as the app."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine import workspace
from engine.configs import Recipe
from engine.recipe import RecipeError, load_recipe

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


class UserError(Exception):
    """Bad input: printed as is (no traceback), exit status 2."""


def validate_inputs(recipe: Recipe) -> None:
    """Everything we can check before a run exists: model source, block size, dataset rows and lengths.
    Writes nothing; raises UserError naming the file, line and field."""
    from engine.data import DataError, check_lengths, load_chat_dataset

    model_dir = _model_dir(recipe.model.source)
    _check_block_size(recipe, model_dir)
    tokenizer = _tokenizer_for(recipe, model_dir)
    try:
        for source in filter(None, (recipe.data.source, recipe.data.eval_source)):
            rows = load_chat_dataset(source, root=workspace.ASSETS)
            issues = check_lengths(rows, tokenizer, recipe.data.max_length, source=source) if tokenizer else []
            if issues:
                raise DataError(issues)
    except DataError as exc:
        raise UserError(str(exc)) from None


def _model_dir(source: str) -> Path | None:
    """The local directory behind model.source (the embedded model's tokenizer dir stands in), or None for a hub id."""
    if source == "embedded:tiny-gpt-oss":
        return None
    if source.startswith("embedded:"):
        raise UserError(f"model.source: unknown embedded model {source!r}; the embedded one is 'embedded:tiny-gpt-oss'")
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise UserError(f"model.source: {source}: no model directory with a config.json there; "
                        "pass a gpt-oss checkpoint directory or a hub id like openai/gpt-oss-20b")
    return local if looks_local else None


def _check_block_size(recipe: Recipe, model_dir: Path | None) -> None:
    """FP4 blocks run along the experts' input dims (hidden size, intermediate size): the block must divide both."""
    if recipe.ptq.block_size is None or not recipe.ptq.formats:
        return
    if model_dir is None and recipe.model.source != "embedded:tiny-gpt-oss":
        return  # a hub id: dims known only after download; the PTQ stage checks again
    config = json.loads((model_dir / "config.json").read_text()) if model_dir else {"hidden_size": 128,
                                                                                     "intermediate_size": 128}
    for dim_name in ("hidden_size", "intermediate_size"):
        dim = config.get(dim_name)
        if dim and dim % recipe.ptq.block_size:
            raise UserError(f"ptq.block_size: {recipe.ptq.block_size} does not divide the model's {dim_name} ({dim}); "
                            f"choose a block size that divides it (e.g. 32 or 16)")


def _tokenizer_for(recipe: Recipe, model_dir: Path | None):
    """The tokenizer the run will use, when it is on disk (embedded or local); None for a hub id."""
    from engine import models, tiny

    if recipe.model.source == "embedded:tiny-gpt-oss":
        return tiny.embedded_tokenizer()
    if model_dir is not None and any(model_dir.glob("tokenizer*")):
        return models.load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    return None


def load_and_validate(recipe_path: str, overrides: dict) -> Recipe:
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as exc:
        raise UserError(str(exc)) from None
    validate_inputs(recipe)
    return recipe


def cmd_run(recipe_path: str, workdir: Path, overrides: dict, wait: bool = True) -> int:
    recipe = load_and_validate(recipe_path, overrides)
    from engine.pipeline import enqueue
    from engine.worker import ensure_engine
    from storage import Store

    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(workspace.db_path(workdir))
    run_id = enqueue(store, recipe, workdir)
    print(f"run {run_id} queued ({len(store.list_jobs(run_id))} jobs) in {workdir}", flush=True)
    ensure_engine(workdir, idle_exit=15.0)
    if not wait:
        return 0
    return watch(store, run_id)


def watch(store, run_id: str, poll_s: float = 1.0) -> int:
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
        print(f"\nstopped watching; the run goes on in the engine. Follow it with: python launch.py status {run_id}")
        return 130
    return finish(store, run_id, time.time() - started)


def finish(store, run_id: str, elapsed: float) -> int:
    from engine.report import format_table, summary

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
        print(f"\n{job['config']['key']} {job['status']}: {job['error']}\n  log: {job['log_path']}", file=sys.stderr)
    return 0 if run["status"] == "succeeded" else 1


def cmd_resume(run_id: str, workdir: Path, wait: bool = True) -> int:
    from engine.worker import ensure_engine

    store = _existing_store(workdir)
    if store.get_run(run_id) is None:
        raise UserError(f"no run {run_id} in {workdir}; list runs with: python launch.py status")
    requeued = resume_run(store, run_id)
    if not requeued:
        print(f"run {run_id}: nothing to resume (no failed, interrupted or cancelled jobs)")
        return 0
    print(f"run {run_id}: re-queued jobs {requeued}")
    ensure_engine(workdir, idle_exit=15.0)
    return watch(store, run_id) if wait else 0


def resume_run(store, run_id: str) -> list[int]:
    """Re-queue the run's unfinished jobs; trainers pick up their last checkpoint."""
    ids = []
    for job in store.list_jobs(run_id):
        if job["status"] in ("failed", "interrupted", "cancelled"):
            store.requeue_job(job["id"])
            ids.append(job["id"])
    store.refresh_run_status(run_id)
    return ids


def cmd_cancel(run_id: str, workdir: Path) -> int:
    from engine.worker import request_cancel

    store = _existing_store(workdir)
    jobs = store.list_jobs(run_id)
    if not jobs:
        raise UserError(f"no run {run_id} in {workdir}")
    for job in jobs:
        if job["status"] in ("queued", "running"):
            print(f"{job['config']['key']}: {request_cancel(store, job['id'])}")
    return 0


def cmd_status(run_id: str | None, workdir: Path, as_json: bool = False) -> int:
    store = _existing_store(workdir)
    if run_id is None:
        runs = store.list_runs()
        if as_json:
            print(json.dumps(runs, default=str, indent=1))
        for run in runs:
            print(f"{run['id']}  {run['status']:<11} {run['name']}")
        return 0
    if store.get_run(run_id) is None:
        raise UserError(f"no run {run_id} in {workdir}")
    for job in store.list_jobs(run_id):
        print(f"{job['id']:>4} {job['config']['key']:<22} {job['status']:<11} {job.get('message') or ''}")
    from engine.report import format_table, summary

    print()
    print(format_table(summary(store, run_id)))
    return 0


def _existing_store(workdir: Path):
    from storage import Store

    db = workspace.db_path(workdir)
    if not db.exists():
        raise UserError(f"no workspace at {workdir} (no {db.name}); pass --workdir or set QAT_STUDIO_HOME")
    return Store(db)
