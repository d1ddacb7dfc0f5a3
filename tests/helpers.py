"""Shared by the end-to-end tests: run launch.py, wait for conditions, stop engines, the resumed smoke run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def launch(args: list[str], timeout: float = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` in the repo, as a user would run it."""
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_engines(store) -> None:
    """SIGTERM every live engine of a workspace and wait until none is left (tests leave no process behind)."""
    for engine in store.live_engines(max_age_s=60):
        try:
            os.kill(engine["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(_alive(e["pid"]) for e in store.live_engines(max_age_s=60)), timeout=60,
             what="the engine to stop")


def _alive(pid: int) -> bool:
    from engine.runtime.worker import _pid_alive

    return _pid_alive(pid)


# Evaluation caps for the tests of mechanics: every evaluation still generates and scores answers of both tasks,
# 8 of 16 tokens instead of the smoke recipe's 24 of 48 (generation was ~7 s of each of a run's six evaluations).
SMALL_EVAL_FLAGS = ("--eval.max_examples_per_task", "4", "--eval.max_new_tokens", "16")


def run_killed_and_resumed(workdir: Path, data_flags: tuple[str, ...] = ()) -> tuple:
    """A power cut in miniature: the smoke recipe runs (`launch.py run`, waiting in the foreground); after SFT's first
    checkpoint the run command, the engine and the job's process are all SIGKILLed, with no app to notice. Then
    `status` (what it says is kept) and `resume` from the CLI finish the run. `data_flags` (conftest's
    small_demo_data) and SMALL_EVAL_FLAGS keep it short: what it checks is the run's bookkeeping, not its scores."""
    from engine.runtime.workspace import checkpoint_dir, latest_checkpoint
    from storage import Store

    db = workdir / "studio.db"
    run_cmd = subprocess.Popen([sys.executable, "launch.py", "--workdir", str(workdir), "run",
                                "assets/recipes/smoke.yaml", "--sft.max_steps", "16", "--sft.save_steps", "4",
                                *data_flags, *SMALL_EVAL_FLAGS],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: db.exists(), timeout=300, what="the run to be queued")
    store = Store(db)
    run_id = wait_for(lambda: store.list_runs() and store.list_runs()[0]["id"], timeout=60, what="the run")
    sft = wait_for(lambda: next((j for j in store.list_jobs(run_id) if j["stage"] == "sft"), None), timeout=60,
                   what="the run's jobs")
    ckpts = checkpoint_dir(Path(store.get_run(run_id)["run_dir"]), "sft")

    def past_a_checkpoint() -> bool:  # steps logged after the newest checkpoint: resume must drop them
        newest, logged = latest_checkpoint(ckpts), store.metrics(job_id=sft["id"], names=["loss"])[-1:]
        return bool(newest and logged and logged[0]["step"] > int(newest.name.split("-")[1]))

    wait_for(past_a_checkpoint, timeout=900, what="SFT to pass its first checkpoint")
    info = {}
    engines = [e["pid"] for e in store.live_engines(max_age_s=60)]
    job = store.get_job(sft["id"])
    info["sft_niceness"] = psutil.Process(job["pid"]).nice()  # jobs run below the web app's priority
    for pid in [run_cmd.pid, *engines]:
        os.kill(pid, signal.SIGKILL)
    os.killpg(job["pid"], signal.SIGKILL)
    run_cmd.wait()
    wait_for(lambda: not any(_alive(pid) for pid in [*engines, job["pid"]]), timeout=30, what="the kills")
    info.update({"sft_job": sft["id"], "checkpoint_step": int(latest_checkpoint(ckpts).name.split("-")[1]),
                 "killed_at_step": store.metrics(job_id=sft["id"], names=["loss"])[-1]["step"],
                 "row_after_kill": store.get_job(sft["id"])["status"]})
    status = launch(["--workdir", str(workdir), "status", run_id], timeout=300)
    info["status_stdout"], info["status_returncode"] = status.stdout, status.returncode
    info["status_after_restart"] = store.get_job(sft["id"])["status"]
    info["error_after_restart"] = store.get_job(sft["id"])["error"]
    info["engine_rows"] = [e["status"] for e in store.list_engines()]
    resumed = launch(["--workdir", str(workdir), "resume", run_id])
    info["resume_stdout"] = resumed.stdout
    info["resume_returncode"] = resumed.returncode
    return store, run_id, info
