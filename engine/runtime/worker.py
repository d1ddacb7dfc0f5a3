"""The engine: a background process that runs queued jobs, each in a child process.

    python launch.py engine [--workdir W]       (or started on demand by `run` and by the app)

- Claims jobs from SQLite (atomically; dependencies first; one job per device at a time).
- Starts `python -m engine.stages.job` in a new process group with stdout/stderr appended to the job's log file,
  so nothing ever blocks on a pipe and closing a browser cannot stall training.
- Cancels by killing the job's whole process group and each rank's (torchrun puts every rank in its own session).
- Heartbeats in storage; on start it kills what is left of jobs a dead engine left 'running' and marks them
  'interrupted' (engine/runtime/processes.py decides what is still alive, by pid and process start time).
- Stops cleanly on SIGTERM (`launch.py stop`): running jobs become 'interrupted', resumable.
- An engine started for the app (`--exit-without-app`) exits once idle and no app has beaten for that long.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.runtime import failure_hints, processes, telemetry, workspace
from storage import Store

HEARTBEAT_S = 2.0
APP_GONE_EXIT_S = 600.0  # an app-started engine exits when idle and no app has beaten for 10 minutes
APP_HEARTBEAT_S = 30.0  # how often the app beats (ui/app.py)
KILL_GRACE_S = 10.0
JOB_NICENESS = 10


@dataclass
class Running:
    job: dict
    proc: subprocess.Popen
    resources: set[str]
    cancel_sent_at: float | None = None
    group_pids: set[int] = field(default_factory=set)


class Engine:
    def __init__(self, workdir: Path, idle_exit: float | None = None, poll_s: float = 0.3,
                 telemetry_every_s: float = 10.0, app_gone_exit: float | None = None):
        self.workdir = workdir
        self.telemetry_every_s = telemetry_every_s
        self.store = Store(workspace.db_path(workdir))
        self.idle_exit = idle_exit
        self.app_gone_exit = app_gone_exit
        self.poll_s = poll_s
        self.running: dict[int, Running] = {}
        self.stopping = False
        self.engine_id: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def serve(self) -> int:
        other = processes.live_engine(self.store, exclude_pid=os.getpid())
        if other:
            print(f"an engine is already running on {self.workdir} (pid {other['pid']}); not starting another",
                  flush=True)
            return 1
        self.engine_id = self.store.register_engine(os.getpid(), socket.gethostname())
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._recover()
        # The engine, not the web app, records the runs' telemetry history: headless runs have it too.
        recorder = telemetry.Recorder(self.store, self.workdir, every_s=self.telemetry_every_s)
        recorder.start()
        print(f"engine {self.engine_id} (pid {os.getpid()}) serving {self.workdir}", flush=True)
        last_beat, idle_since = 0.0, time.time()
        try:
            while not self.stopping:
                now = time.time()
                if now - last_beat >= HEARTBEAT_S:
                    self.store.engine_heartbeat(self.engine_id)
                    last_beat = now
                self._reap()
                self._handle_cancels()
                self._start_ready_jobs()
                if self.running or self.store.list_jobs(status="queued"):
                    idle_since = now
                elif self.idle_exit is not None and now - idle_since > self.idle_exit:
                    print("idle; exiting", flush=True)
                    break
                elif self._app_gone(now, idle_since):
                    print(f"idle and no app seen for {self.app_gone_exit:.0f} s; exiting", flush=True)
                    break
                time.sleep(self.poll_s)
        finally:
            recorder.stop()
            self._shutdown()
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _app_gone(self, now: float, idle_since: float) -> bool:
        """Idle since `idle_since`, and no app beat within app_gone_exit (an app that never beat counts from then)."""
        if self.app_gone_exit is None or now - idle_since <= self.app_gone_exit:
            return False
        return now - (self.store.last_app_seen() or 0.0) > self.app_gone_exit

    def _recover(self) -> None:
        """Jobs a dead engine left 'running' (or 'cancelling') cannot be followed any more: kill what is left of
        them (every rank too) and mark them interrupted (cancelled)."""
        processes.settle_dead_jobs(self.store, kill_live=True)

    def _shutdown(self) -> None:
        for item in list(self.running.values()):
            self._signal(item, signal.SIGTERM)
        deadline = time.time() + KILL_GRACE_S
        for item in list(self.running.values()):
            try:
                item.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self._signal(item, signal.SIGKILL)
                item.proc.wait()
            self._signal(item, signal.SIGKILL)  # ranks the launcher left behind
            for job in self._jobs_of(item):
                if job["status"] in ("running", "cancelling"):
                    self.store.finish_job(job["id"], "interrupted", error="the engine was stopped; resume this job")
            self.store.refresh_run_status(item.job["run_id"])
        self.running.clear()
        if self.engine_id is not None:
            self.store.stop_engine(self.engine_id)

    # -- jobs --------------------------------------------------------------------------------------------------
    def _busy(self) -> set[str]:
        return set().union(*(r.resources for r in self.running.values())) if self.running else set()

    def _start_ready_jobs(self) -> None:
        while not self.stopping:
            job = self.store.claim_job(self._busy(), pid=None)
            if job is None:
                return
            self._start(job)

    def _start(self, job: dict) -> None:
        run = self.store.get_run(job["run_id"])
        log = workspace.log_path(Path(run["run_dir"]), job["id"], job["stage"], job["fmt"])
        log.parent.mkdir(parents=True, exist_ok=True)
        gpus = [r.split(":", 1)[1] for r in job["resources"].split(",") if r.startswith("cuda:")]
        env = job_env(gpus)
        cmd = [sys.executable, "-m", "engine.stages.job", "--workdir", str(self.workdir), "--job", str(job["id"])]
        try:
            launch = self._accelerate_launch(run, job, gpus)
        except Exception as exc:  # noqa: BLE001 - a launch that cannot be built fails the job, not the engine
            self.store.finish_job(job["id"], "failed", error=f"could not launch the job: {exc}")
            self.store.refresh_run_status(job["run_id"])
            return
        with open(log, "ab") as out:
            if launch is not None:  # multi-process training: accelerate launch starts the ranks, all in our session
                cmd = launch.argv
                out.write(("accelerate launch; the command of each machine rank:\n" +
                           "".join(f"  rank {i}: {c}\n" for i, c in enumerate(launch.commands))).encode())
                out.flush()
            proc = subprocess.Popen(_at_low_priority(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=workspace.REPO_ROOT, env=env, start_new_session=True)
        self.store.update_job(job["id"], pid=proc.pid, pid_started_at=processes.start_time(proc.pid),
                              log_path=str(log))
        self.store.refresh_run_status(job["run_id"])
        self.running[job["id"]] = Running(job, proc, set(job["resources"].split(",")))
        print(f"started job {job['id']} {job['config'].get('key')} pid {proc.pid}", flush=True)

    def _accelerate_launch(self, run: dict, job: dict, gpus: list[str]):
        """The accelerate launch of a multi-process training job (its config written, the commands recorded for the
        UI as a 'launch' artifact), or None for a one-process job."""
        from engine.runtime import distributed
        from engine.recipe.configs import Recipe

        launch = distributed.prepare_launch(Recipe.model_validate(run["recipe"]), job, Path(run["run_dir"]),
                                            self.workdir, gpus)
        if launch is not None:
            self.store.add_artifact(run["id"], job["id"], "launch", str(launch.config_path),
                                    meta={"commands": launch.commands, "argv": launch.argv})
        return launch

    def _process_of(self, job: dict) -> Running | None:
        """The process running `job`: the one started for it, or the one it was chained into (same pid)."""
        item = self.running.get(job["id"])
        if item is None and job.get("pid"):
            item = next((r for r in self.running.values() if r.proc.pid == job["pid"]), None)
        return item

    def _jobs_of(self, item: Running) -> list[dict]:
        """Every job the process took: the one it was started for and those it chained into, latest state."""
        first = self.store.get_job(item.job["id"])
        chained = [j for j in self.store.list_jobs(item.job["run_id"], status=("running", "cancelling"))
                   if j["pid"] == item.proc.pid and j["id"] != first["id"]]
        return [first, *chained]

    def _reap(self) -> None:
        for job_id, item in list(self.running.items()):
            code = item.proc.poll()
            if code is None:
                continue
            del self.running[job_id]
            self._signal(item, signal.SIGKILL)  # leftovers: dataloader workers, ranks of a killed launcher
            for job in self._jobs_of(item):
                if item.cancel_sent_at is not None and job["status"] in ("running", "cancelling") \
                        or job["status"] == "cancelling":
                    self.store.finish_job(job["id"], "cancelled", error="cancelled by the user")
                    self._note_gpu_release(job["id"], item)
                elif job["status"] == "running":  # the child died before it could record its outcome
                    tail = _tail(job["log_path"])
                    status = "interrupted" if code < 0 else "failed"
                    self.store.finish_job(job["id"], status, error=failure_hints.explain_exit(code, tail),
                                          error_detail=tail)
                self.store.refresh_run_status(job["run_id"])
            print(f"job {job_id} (and the jobs chained after it) ended with exit status {code}", flush=True)

    def _note_gpu_release(self, job_id: int, item: Running) -> None:
        gpus = sorted(int(r.split(":")[1]) for r in item.resources if r.startswith("cuda:"))
        if gpus:
            from engine.runtime.telemetry import gpu_release_note

            ranks = {pid for job in self._jobs_of(item) for pid, _ in job.get("ranks") or []}
            try:
                note = gpu_release_note(item.group_pids | ranks | {item.proc.pid}, gpus)
            except Exception as exc:  # noqa: BLE001 - a failing NVML read must not take the engine down
                note = f"GPU memory release not checked (NVML: {type(exc).__name__}: {exc})"
            self.store.update_job(job_id, message=note)

    def _handle_cancels(self) -> None:
        now = time.time()
        for job in self.store.list_jobs(status="cancelling"):
            item = self._process_of(job)
            if item is None:
                self.store.finish_job(job["id"], "cancelled", error="cancelled by the user")
                self.store.refresh_run_status(job["run_id"])
            elif item.cancel_sent_at is None:
                # remembered to check their GPU memory afterwards
                item.group_pids = processes.group_pids(item.proc.pid) | set(processes.job_pids(job))
                self._signal(item, signal.SIGTERM)
                item.cancel_sent_at = now
            elif now - item.cancel_sent_at > KILL_GRACE_S:
                self._signal(item, signal.SIGKILL)

    def _signal(self, item: Running, sig: int) -> None:
        """The process we started (its whole group: it is our child, so its pid is not yet free for reuse even once
        it exited), and every rank recorded by the jobs it ran: torchrun starts ranks in sessions of their own."""
        processes.kill_group(item.proc.pid, sig)
        for job in self._jobs_of(item):
            processes.kill_job(job, sig)


def job_env(gpus: list[str], base: dict | None = None) -> dict:
    """A job's environment: only its GPUs visible (none for a CPU job, so it cannot grab one another job holds),
    numbered as NVML numbers them. The GPU picker, the queue and the cancel's release check use NVML's indices (PCI
    bus order); CUDA's default order is "fastest first", which can differ on a machine of mixed GPUs."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def _at_low_priority(cmd: list[str]) -> list[str]:
    """Jobs run at nice 10: training takes every core it can get, and the web page must still answer at once.
    Through the `nice` program, which execs the command in the same process (the pid we track), rather than a
    preexec_fn: the engine has a telemetry thread, and Python code between fork and exec is unsafe with threads."""
    nice = shutil.which("nice")
    return [nice, "-n", str(JOB_NICENESS), *cmd] if nice else cmd


_pid_alive = processes.pid_alive  # kept for callers of the old name


def _tail(path: str | None, lines: int = 40) -> str:
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64_000))
        return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")


def ensure_engine(workdir: Path, idle_exit: float | None = None,
                  app_gone_exit: float | None = APP_GONE_EXIT_S) -> int | None:
    """Start a detached engine on `workdir` unless one is alive; returns the new engine's pid (None if one ran).
    It exits after `idle_exit` idle seconds (the CLI's), or - the app's - once idle with no app beating for
    `app_gone_exit` seconds, so an engine never outlives its app for long."""
    store = Store(workspace.db_path(workdir))
    if processes.live_engine(store):
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "engine.runtime.worker", "--workdir", str(workdir)]
    if idle_exit is not None:
        cmd += ["--idle-exit", str(idle_exit)]
    if app_gone_exit is not None:
        cmd += ["--exit-without-app", str(app_gone_exit)]
    with open(workdir / "engine.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workspace.REPO_ROOT, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until it has registered, so callers see it as live
        if any(e["pid"] == proc.pid for e in store.live_engines()):
            return proc.pid
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited at once (status {proc.returncode}); see {workdir / 'engine.log'}")
        time.sleep(0.1)
    raise RuntimeError(f"the engine did not start within 30 s; see {workdir / 'engine.log'}")


def stop_engine(workdir: Path, timeout: float = KILL_GRACE_S + 20) -> list[int]:
    """Stop the workspace's engines (SIGTERM; each stops its jobs, marks them 'interrupted' and unregisters) and wait
    until they are gone. Engines that died without unregistering are marked dead. Returns the pids stopped."""
    store = Store(workspace.db_path(workdir))
    alive = [e for e in store.running_engines() if processes.engine_alive(e, max_age_s=float("inf"))]
    for engine in alive:
        os.kill(engine["pid"], signal.SIGTERM)
    deadline = time.time() + timeout
    while any(processes.engine_alive(e, max_age_s=float("inf")) for e in alive) and time.time() < deadline:
        time.sleep(0.2)
    still = [e["pid"] for e in alive if processes.engine_alive(e, max_age_s=float("inf"))]
    if still:
        raise RuntimeError(f"engine pid {still} did not stop within {timeout:.0f} s")
    processes.settle_dead_jobs(store)  # what a killed engine left behind, if any
    return [e["pid"] for e in alive]


def request_cancel(store: Store, job_id: int) -> str:
    """Cancel a job: queued ones at once, running ones by the engine (it kills the process group)."""
    job = store.get_job(job_id)
    if job is None:
        raise ValueError(f"no job {job_id}")
    if job["status"] == "queued":
        store.finish_job(job_id, "cancelled", error="cancelled by the user before it started")
    elif job["status"] == "running":
        store.update_job(job_id, status="cancelling")
    store.refresh_run_status(job["run_id"])
    return store.get_job(job_id)["status"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the QAT Studio engine in the foreground.")
    parser.add_argument("--workdir", default=None, help="workspace (default: $QAT_STUDIO_HOME or ./workspace)")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    parser.add_argument("--exit-without-app", type=float, default=None,
                        help="exit once idle and no app has been seen for this many seconds")
    args = parser.parse_args(argv)
    workdir = workspace.resolve_workdir(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return Engine(workdir, idle_exit=args.idle_exit, app_gone_exit=args.exit_without_app).serve()


if __name__ == "__main__":
    sys.exit(main())
