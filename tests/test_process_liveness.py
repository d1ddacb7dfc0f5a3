"""Is a job really still running? (engine/runtime/processes.py) Real processes, a real SQLite file, the real engine
and CLI: a job whose engine died is recovered, a pid taken by another process after a reboot is neither 'running'
nor killed, `launch.py stop` and the app-less exit stop an engine cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from engine.runs import resume_note, resume_run
from engine.runtime import processes
from engine.runtime.worker import Engine, ensure_engine, stop_engine
from storage import Store
from tests.helpers import launch, wait_for


@pytest.fixture
def sleeper():
    """An unrelated live process in a session of its own (stands for a job's process, or an innocent bystander)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _run_with_job(store: Store, workdir, status: str = "running", **fields) -> tuple[str, int]:
    (workdir / "runs" / "r").mkdir(parents=True, exist_ok=True)
    run_id = store.create_run("liveness", {}, run_dir=str(workdir / "runs" / "r"))
    job = store.add_job(run_id, "sft", config={"key": "sft"})
    store.update_job(job, status=status, started_at=time.time() - 50, **fields)
    store.refresh_run_status(run_id)
    return run_id, job


def _dead_engine(store: Store, pid: int, started_at: float) -> int:
    """An engine row as a killed engine leaves it: 'running', its last heartbeat a minute old."""
    engine_id = store.register_engine(pid, "test")
    store._update("engines", engine_id, {"started_at": started_at, "heartbeat_at": time.time() - 60})
    return engine_id


def test_engine_recovery_kills_and_marks_what_a_dead_engine_left(workdir, sleeper):
    """A job process that outlived its engine is killed (its whole group) and marked interrupted; a job in the same
    process (chained) too; a job being cancelled becomes cancelled; the dead engine's row is marked dead."""
    store = Store(workdir / "studio.db")
    started = processes.start_time(sleeper.pid)
    run_id, job = _run_with_job(store, workdir, pid=sleeper.pid, pid_started_at=started)
    chained = store.add_job(run_id, "evaluate", config={"key": "evaluate:sft"}, depends_on=[job])
    store.update_job(chained, status="running", pid=sleeper.pid, pid_started_at=started, started_at=time.time())
    _, cancelling = _run_with_job(store, workdir, status="cancelling", pid=99_999_999, pid_started_at=1.0)
    dead = _dead_engine(store, 99_999_998, time.time() - 100)
    assert processes.job_alive(store.get_job(job))

    assert Engine(workdir, idle_exit=0.3, poll_s=0.1).serve() == 0

    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    for job_id in (job, chained):
        row = store.get_job(job_id)
        assert row["status"] == "interrupted" and "engine stopped" in row["error"], row
    assert store.get_job(cancelling)["status"] == "cancelled"
    assert store.get_run(run_id)["status"] == "interrupted"
    assert store._get("engines", dead)["status"] == "dead"


def test_after_a_reboot_a_reused_pid_is_not_the_job(workdir, sleeper):
    """The job row's pid now belongs to an unrelated process (started after the job's): `status` says interrupted,
    neither `status` nor the engine's recovery touches that process, and `resume` re-queues the job."""
    store = Store(workdir / "studio.db")
    started = processes.start_time(sleeper.pid)
    run_id, job = _run_with_job(store, workdir, pid=sleeper.pid, pid_started_at=started - 3600)
    engine = _dead_engine(store, sleeper.pid, started - 3600)  # the engine's pid was reused too

    out = launch(["--workdir", str(workdir), "status", run_id], timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if f"{job} sft" in " ".join(line.split()))
    assert "interrupted" in line and "running" not in line, out.stdout
    assert store.get_job(job)["status"] == "interrupted" and store._get("engines", engine)["status"] == "dead"

    store.update_job(job, status="running")  # as before the status call: the engine's recovery decides alone
    assert Engine(workdir, idle_exit=0.3, poll_s=0.1).serve() == 0
    assert store.get_job(job)["status"] == "interrupted"
    assert sleeper.poll() is None and psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE

    assert resume_run(store, run_id) == [job]  # what `resume` does before it starts an engine
    assert resume_note(store, store.get_job(job)) == "no checkpoint yet: restarting from step 0"


def test_stop_ends_the_engine_and_an_app_engine_exits_without_its_app(workdir):
    store = Store(workdir / "studio.db")
    try:
        pid = ensure_engine(workdir, idle_exit=None, app_gone_exit=2.0)
        beat_until = time.time() + 5
        app_id = None
        while time.time() < beat_until:  # an app beating: the idle engine stays
            app_id = store.app_heartbeat(app_id, 1, "test")
            time.sleep(0.3)
        assert processes.pid_alive(pid), "the engine left while an app was beating"
        wait_for(lambda: not processes.pid_alive(pid), timeout=15, what="the engine to exit once the app stopped")
        assert "no app seen" in (workdir / "engine.log").read_text()
        assert store.list_engines()[-1]["status"] == "stopped"

        pid = ensure_engine(workdir, idle_exit=None, app_gone_exit=None)
        out = launch(["--workdir", str(workdir), "stop"], timeout=120)
        assert out.returncode == 0 and f"stopped engine pid {pid}" in out.stdout, out.stdout + out.stderr
        assert not processes.pid_alive(pid) and store.list_engines()[-1]["status"] == "stopped"
        again = launch(["--workdir", str(workdir), "stop"], timeout=120)
        assert again.returncode == 0 and "no engine running" in again.stdout
    finally:
        stop_engine(workdir)  # also when an assertion failed: no engine outlives the test


def test_gpu_release_check_sees_every_rank(workdir, sleeper, fake_gpu):
    """A cancelled multi-process job: NVML (the conftest's fake driver) shows a rank - this test process, registered
    as one - still holding memory on the job's GPU, and the check after the cancel must name it, though the rank is
    outside the launcher's process group."""
    from engine.runtime.worker import Running

    store = Store(workdir / "studio.db")
    _, job = _run_with_job(store, workdir, pid=sleeper.pid, pid_started_at=processes.start_time(sleeper.pid))
    store.register_rank(job, os.getpid(), processes.start_time(os.getpid()))
    item = Running(store.get_job(job), sleeper, {"cuda:0"})
    Engine(workdir)._note_gpu_release(job, item)
    assert f"GPU memory still held after the cancel: pid {os.getpid()} on cuda:0" in store.get_job(job)["message"]
