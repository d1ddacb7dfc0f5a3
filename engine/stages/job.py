"""One job, in its own process: `python -m engine.stages.job --workdir W --job N`.

The engine starts this with stdout/stderr going to the job's log file. The stage's outcome is written to storage
here (succeeded, or failed with the error, relevant log lines and advice); if this process dies without writing
(SIGKILL, OOM killer), the engine records what happened from the exit status.

Under `accelerate launch` (multi-process SFT / QAT, engine/runtime/distributed.py) every rank runs this. Only the main rank
records success. A failure is recorded by the first rank that fails, main or not, and only while the job is still
running: that rank has the real error, and the others (stopped by torchrun, or failing in a collective because a
peer died) must not overwrite it. A rank killed outright records nothing; the engine then reads the log tail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from engine.runtime import distributed, failure_hints, gpu_memory, processes, workspace
from engine.recipe.configs import Recipe
from engine.runtime.context import Context, pick_device
from engine.runtime.job_timing import JobTiming, job_start_time
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
    if distributed.world_size() > 1:  # the engine must reach every rank on a hard kill: each has its own session
        store.register_rank(job["id"], os.getpid(), processes.start_time(os.getpid()))
    models: dict = {}  # kept from one job of the chain to the next (engine/stages/common.py: open_model)
    code = run_job(store, workdir, job, models, chained=False)
    while code == 0:
        job = claim_next_job(store, job, models)
        if job is None:
            break
        code = run_job(store, workdir, job, models, chained=True)
    return code


def run_job(store: Store, workdir, job: dict, models: dict, chained: bool) -> int:
    """Run one job's stage and record its outcome; 0 on success. `chained`: claimed by this process after another
    job (claim_next_job), so its time starts at that claim, not at the process's start."""
    run = store.get_run(job["run_id"])
    started = time.time()
    timing = JobTiming(job_start_time(job, chained), Path(run["run_dir"]) if run.get("run_dir") else None)
    rank, main = distributed.rank(), distributed.is_main_process()
    where = f"rank {rank}/{distributed.world_size()}, " if distributed.world_size() > 1 else ""
    print(f"== job {job['id']} {job['config'].get('key', job['stage'])} (run {run['id']}, {where}pid {os.getpid()}) ==",
          flush=True)
    try:
        recipe = Recipe.model_validate(run["recipe"])
        device = _rank_device(pick_device(recipe, job["resources"]))
        cap_gpu_memory(recipe, device)
        ctx = Context(store, workdir, run, job, recipe, device, models=models, timing=timing)
        from engine.stages import stage_function

        stage = stage_function(job["stage"])  # imports the stage's module: part of start + imports
        timing.stage_begins()
        result = stage(ctx) or {}
        timing.stage_ends()
        if main:
            store.update_job(job["id"], progress=1.0, message=_summary(result), timing=timing.result())
            store.finish_job(job["id"], "succeeded")
            print(f"== job {job['id']} succeeded (recorded by rank {rank})", flush=True)
        print(f"== done in {time.time() - started:.1f} s: {json.dumps(result, default=str)[:2000]}", flush=True)
        _leave_process_group()
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the UI, KeyboardInterrupt included
        detail = traceback.format_exc()
        print(detail, file=sys.stderr, flush=True)
        message = failure_hints.explain(exc, detail)
        if store.get_job(job["id"])["status"] == "running":  # first failure wins: later ranks fail because of it
            store.update_job(job["id"], timing=timing.result())  # where the time went until it failed
            store.finish_job(job["id"], "failed", error=f"{where}{message}", error_detail=detail[-6000:])
            main = True  # this rank recorded the outcome: it refreshes the run below
        return 1
    finally:
        if main:
            store.refresh_run_status(job["run_id"])


def claim_next_job(store: Store, done: dict, models: dict) -> dict | None:
    """Take the next ready job of the same run on the same device, so it runs in this process: torch, transformers
    and modelopt are imported once per chain instead of once per job (27.7 s for modelopt alone on the H200,
    2026-12-03), and a model loaded for one job serves the next (an evaluation, then the export of that model).

    Each job keeps its own status, log file, metrics and resume; a crash ends this process and the engine marks the
    job that was running, starts a fresh process for what is left. Not chained: multi-process jobs (accelerate
    launches them), runs with `hardware.reuse_process: false`, and anything after a failure (this process may be
    in a bad state: out of memory, say).
    """
    from engine.stages.common import model_needed, release_models, reuses

    run = store.get_run(done["run_id"])
    recipe = Recipe.model_validate(run["recipe"])
    if distributed.world_size() > 1 or not recipe.hardware.reuse_process:
        return None
    kept = next(iter(models), None)
    # The report needs no device (its own 'report' resource, so it never waits for another run's GPU), but in a
    # fresh process it paid 4.2 s of imports to write a summary (H200, 2026-12-03): the chain takes it too.
    ready = [j for j in store.ready_jobs(run["id"], done["resources"]) + store.ready_jobs(run["id"], "report")
             if not distributed.uses_accelerate(recipe, j["stage"])]
    run_dir = Path(run["run_dir"])
    # The job that reuses the kept model first, then one built on it (a LoRA stage's adapters over it), then by id.
    ready.sort(key=lambda j: (reuses(model_needed(j, recipe), kept, run_dir), j["id"]))
    for job in ready:
        log = workspace.log_path(Path(run["run_dir"]), job["id"], job["stage"], job["fmt"])
        claimed = store.claim_this_job(job["id"], os.getpid(), str(log), processes.start_time(os.getpid()))
        if claimed is None:
            continue  # taken meanwhile (or no longer ready): try the next one
        use = reuses(model_needed(claimed, recipe), kept, run_dir)
        if use == 2:
            release_models(models)
        print(f"== chaining into job {claimed['id']} {claimed['config'].get('key')}; its log: {log}", flush=True)
        _redirect_output(log)
        print(f"(runs in the process of job {done['id']}: imports already done"
              f"{f', {kept} already loaded' if use < 2 else ''})", flush=True)
        return claimed
    return None


def _redirect_output(log: Path) -> None:
    """Point this process's stdout and stderr (the file descriptors, so C extensions follow) at another job's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _rank_device(device):
    """Under a multi-GPU launch each local rank owns one of the job's GPUs (the engine made them visible)."""
    if device.type != "cuda" or distributed.world_size() == 1:
        return device
    import torch

    torch.cuda.set_device(distributed.local_rank())
    return torch.device("cuda", distributed.local_rank())


def cap_gpu_memory(recipe: Recipe, device) -> None:
    """hardware.gpu_memory_limit_gib, before the stage loads anything (engine/runtime/gpu_memory.py). Every job:
    a chained job runs in this process under the cap its run set (the same run, so the same limit), and every rank
    of a multi-GPU launch runs this for its own GPU."""
    line = gpu_memory.apply_limit(recipe.hardware.gpu_memory_limit_gib, device)
    if line:
        print(line, flush=True)


def _leave_process_group() -> None:
    """Destroy the process group the trainer created, so ranks exit without gloo/NCCL teardown warnings. Only after
    success: after a failure a peer may be gone, and tearing down NCCL then can block; torchrun stops the ranks."""
    if distributed.world_size() == 1 or "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _summary(result: dict) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
             if isinstance(v, (int, float, str)) and len(str(v)) < 80]
    return ", ".join(parts[:6])


if __name__ == "__main__":
    sys.exit(main())
