"""Run a grid of settings in N worker processes, within a time budget.

Why not concurrent.futures: a budget must be able to stop a setting that is still running (a device call dies at
its limit and loses everything not written), and ProcessPoolExecutor cannot kill a running task. Here each worker is
its own process (spawn: safe with CUDA) that takes settings from a queue until it is empty; the parent hands each
result to `on_result` as it arrives (the caller writes it out at once), and at the deadline kills the workers and
returns what finished. Results arrive in completion order; callers must not depend on it.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Outcome:
    done: list[tuple[dict, Any]] = field(default_factory=list)  # (setting, result), in completion order
    failed: list[tuple[dict, str]] = field(default_factory=list)  # (setting, traceback)
    running: list[dict] = field(default_factory=list)  # started, stopped by the budget (or a dead worker)
    partial: list[tuple[dict, Any]] = field(default_factory=list)  # (setting, its last progress()) of those
    not_started: list[dict] = field(default_factory=list)
    out_of_budget: bool = False
    interrupted: bool = False  # KeyboardInterrupt (Ctrl-C, or SIGTERM where the caller maps it): stopped like the budget


_PROGRESS = None  # in a worker, while it runs a setting: (results queue, the setting's index)


def progress(payload: Any) -> None:
    """Called from inside `work`: the setting's result so far. The parent keeps the latest one, so a setting the
    budget cuts off still reports what it had (Outcome.partial). Does nothing outside a worker."""
    if _PROGRESS is not None:
        results, i = _PROGRESS
        # a copy: Queue.put pickles later, in a feeder thread, while `work` may already be changing the payload
        results.put(("progress", i, copy.deepcopy(payload)))


def _worker(index: int, tasks, results, work: Callable, init: Callable | None, init_args: tuple) -> None:
    global _PROGRESS
    try:
        context = init(index, *init_args) if init else None
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        results.put(("init_failed", index, traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            return
        i, setting = item
        results.put(("started", i, index))
        _PROGRESS = (results, i)
        try:
            results.put(("done", i, work(setting, context)))
        except BaseException:  # noqa: BLE001 - one bad setting must not stop the grid
            results.put(("failed", i, traceback.format_exc()))
        finally:
            _PROGRESS = None


def run(settings: list[dict], work: Callable[[dict, Any], Any], jobs: int, *, init: Callable | None = None,
        init_args: tuple = (), budget_s: float | None = None, on_result: Callable[[dict, Any], None] | None = None,
        log: Callable[[str], None] = print) -> Outcome:
    """`work(setting, context)` for every setting in `jobs` processes; `init(worker_index, *init_args)` makes each
    worker's context once. `work`, `init` and their arguments must be picklable (top-level functions)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(settings):
        tasks.put(item)
    workers = [ctx.Process(target=_worker, args=(n, tasks, results, work, init, init_args), daemon=True)
               for n in range(min(jobs, len(settings)))]
    for _ in workers:
        tasks.put(None)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    for w in workers:
        w.start()
    outcome, started, finished, latest = Outcome(), set(), set(), {}
    try:
        _collect(settings, workers, results, deadline, outcome, started, finished, latest, on_result, log)
    except KeyboardInterrupt:
        outcome.interrupted = True
        log("interrupted: stopping the workers")
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(10)
        for q in (tasks, results):
            q.cancel_join_thread()  # unconsumed items must not keep the parent from exiting
            q.close()
    outcome.running = [settings[i] for i in sorted(started - finished)]
    outcome.partial = [(settings[i], latest[i]) for i in sorted(started - finished) if i in latest]
    outcome.not_started = [settings[i] for i in range(len(settings)) if i not in started and i not in finished]
    return outcome


def _collect(settings, workers, results, deadline, outcome, started, finished, latest, on_result, log) -> None:
    """The parent's loop: take the workers' messages until every setting is finished, the deadline passes or every
    worker has exited."""
    while len(finished) < len(settings):
        if deadline is not None and time.monotonic() >= deadline:
            outcome.out_of_budget = True
            log("time budget reached: stopping the workers")
            break
        wait = 1.0 if deadline is None else max(0.01, min(1.0, deadline - time.monotonic()))
        try:
            kind, i, payload = results.get(timeout=wait)
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                log("every worker has exited; settings left unfinished")
                break
            continue
        if kind == "init_failed":
            log(f"worker {i} could not start:\n{payload}")
        elif kind == "started":
            started.add(i)
        elif kind == "progress":
            latest[i] = payload
        elif kind == "done":
            finished.add(i)
            outcome.done.append((settings[i], payload))
            if on_result:
                on_result(settings[i], payload)
        else:
            finished.add(i)
            outcome.failed.append((settings[i], payload))
            log(f"setting {settings[i]} failed:\n{payload}")
