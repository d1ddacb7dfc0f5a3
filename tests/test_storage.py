"""storage/: real SQLite files in tmp_path, real processes for the concurrent claim."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlite_utils import Database

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import storage when run as plain `pytest`

from storage import SCHEMA_VERSION, Store, StorageError, sha256_path  # noqa: E402
from storage.db import derive_run_status  # noqa: E402
from storage.migrations import migrate, schema_version  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "ws" / "studio.db") as opened:
        yield opened


def _tables(path: Path) -> set[str]:
    return set(Database(path).table_names())


# ---- opening, migrations -------------------------------------------------------------------------------------------

def test_v1_file_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path))
    assert migrate(old, target=1) == [1]
    old["runs"].insert({"id": "20240101-000000-abcd", "name": "legacy", "recipe_json": '{"lr": 0.1}',
                        "status": "succeeded", "created_at": 1.0})
    job = old["jobs"].insert({"run_id": "20240101-000000-abcd", "stage": "sft", "status": "succeeded",
                              "created_at": 1.0}).last_pk
    old.conn.close()
    assert "telemetry" not in _tables(path)

    with Store(path) as store:
        assert schema_version(store.db) == SCHEMA_VERSION == 4
        run = store.get_run("20240101-000000-abcd")
        assert run["name"] == "legacy" and run["recipe"] == {"lr": 0.1}
        store.add_telemetry({"gpu": 1})  # v2 tables are usable
        assert store.get_job(job)["timing"] is None  # v4: jobs that ran before have no timing
        store.update_job(job, timing={"load_s": 1.5})
        assert store.get_job(job)["timing"] == {"load_s": 1.5}
    assert {"telemetry", "engines", "servers", "apps"} <= _tables(path)
    with Store(path) as again:  # re-opening applies nothing and loses nothing
        assert migrate(again.db) == [] and len(again.list_runs()) == 1


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match=rf"{re.escape(str(path))}.*version {SCHEMA_VERSION + 1}.*newer"):
        Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"  # we did not modify it
    conn.close()


def _open_and_create_run(path: str, start_at: float) -> str:
    time.sleep(max(0.0, start_at - time.time()))
    with Store(path) as store:
        return store.create_run("x", {})


def test_fresh_workspace_opened_by_several_processes_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "new" / "studio.db")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        start_at = time.time() + 1.0
        run_ids = pool.starmap(_open_and_create_run, [(path, start_at)] * 4)
    with Store(path) as store:  # each migration ran once (a second run would fail: table exists)
        assert schema_version(store.db) == SCHEMA_VERSION and len(store.list_runs()) == len(set(run_ids)) == 4


def test_connection_settings(store: Store) -> None:
    assert store.path.exists()
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


# ---- runs ------------------------------------------------------------------------------------------------------------

def test_run_crud_and_validation(store: Store) -> None:
    first = store.create_run("a", {"sft": {"lr": 1e-4}}, run_dir="/tmp/a")
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", first)
    second = store.create_run("b", {}, run_id="fixed-id")
    store.update_run(first, created_at=1.0)  # make the order unambiguous
    assert [run["id"] for run in store.list_runs()] == [second, first]
    assert store.get_run(first)["recipe"] == {"sft": {"lr": 1e-4}} and store.get_run("nope") is None
    with pytest.raises(StorageError, match="already exists"):
        store.create_run("c", {}, run_id="fixed-id")
    with pytest.raises(StorageError, match="status"):
        store.update_run(first, status="exploded")
    with pytest.raises(StorageError, match="no column"):
        store.update_run(first, colour="red")
    with pytest.raises(StorageError, match="no runs row"):
        store.update_run("missing", name="x")


# ---- jobs ------------------------------------------------------------------------------------------------------------

def test_job_lifecycle_dependencies_skip_and_requeue(store: Store) -> None:
    run = store.create_run("r", {})
    prep = store.add_job(run, "prepare")
    sft = store.add_job(run, "sft", config={"steps": 3}, depends_on=[prep], resources="cuda:0")
    ptq = store.add_job(run, "ptq", "mxfp4", depends_on=[sft], resources="cuda:0")
    ev = store.add_job(run, "evaluate", "mxfp4", target="ptq:mxfp4", depends_on=[ptq])
    assert store.get_job(sft)["config"] == {"steps": 3} and store.get_job(ev)["depends_on"] == [ptq]
    with pytest.raises(StorageError, match="do not exist"):
        store.add_job(run, "x", depends_on=[999])

    claimed = store.claim_job(pid=111)
    assert (claimed["id"], claimed["status"], claimed["pid"], claimed["attempt"]) == (prep, "running", 111, 1)
    assert store.claim_job() is None  # sft waits for prepare
    assert store.get_run(run)["status"] == "running" and store.get_run(run)["started_at"] is not None
    store.finish_job(prep, "succeeded")
    assert store.get_job(prep)["ended_at"] is not None and store.get_job(prep)["progress"] == 1.0
    assert store.claim_job(busy_resources={"cuda:0"}) is None  # sft's GPU is busy
    assert store.claim_job(busy_resources={"cuda:1"})["id"] == sft

    store.update_job(sft, timing={"load_s": 2.0})  # where the failed attempt's time went
    store.finish_job(sft, "failed", "RuntimeError: CUDA OOM\n  at line 3\n  at line 4")
    failed = store.get_job(sft)
    assert failed["error"] == "RuntimeError: CUDA OOM" and "at line 4" in failed["error_detail"]
    assert store.claim_job() is None
    assert store.get_job(ptq)["status"] == "skipped" and store.get_job(ptq)["error"] == f"skipped: job {sft} failed"
    assert store.get_job(ev)["error"] == f"skipped: job {ptq} skipped"  # the skip travels down the chain
    assert store.get_run(run)["status"] == "failed" and store.get_run(run)["ended_at"] is not None
    assert store.refresh_run_status(run) == "failed"  # idempotent

    store.requeue_job(sft)  # resume: the job and everything skipped because of it go back in the queue
    assert [store.get_job(j)["status"] for j in (prep, sft, ptq, ev)] == ["succeeded", "queued", "queued", "queued"]
    assert store.get_job(sft)["error"] is None and store.get_job(sft)["ended_at"] is None
    assert store.get_job(sft)["timing"] is None  # the last attempt's timing is not shown as this one's
    assert store.get_run(run)["status"] == "running" and store.get_run(run)["ended_at"] is None
    again = store.claim_job()
    assert again["id"] == sft and again["attempt"] == 2
    with pytest.raises(StorageError, match="running"):
        store.requeue_job(sft)
    with pytest.raises(StorageError, match="must be one of"):
        store.finish_job(sft, "queued")


def test_claim_skips_busy_resources_but_keeps_id_order(store: Store) -> None:
    run = store.create_run("r", {})
    two_gpu = store.add_job(run, "qat", resources="cuda:0, cuda:1")
    one_gpu = store.add_job(run, "ptq", resources="cuda:0")
    cpu = store.add_job(run, "export", resources="cpu")
    assert store.claim_job(busy_resources={"cuda:1"})["id"] == one_gpu
    assert store.claim_job(busy_resources={"cuda:0", "cuda:1"})["id"] == cpu
    assert store.claim_job(busy_resources={"cuda:0"}) is None
    assert store.claim_job()["id"] == two_gpu


def test_an_interrupted_job_interrupts_its_run_while_nothing_runs(store: Store) -> None:
    run = store.create_run("r", {})
    first, second = store.add_job(run, "sft"), store.add_job(run, "ptq")
    store.claim_job()
    store.finish_job(first, "interrupted", error="engine restarted")  # as engine/runtime/processes.py marks it
    assert store.get_job(first)["status"] == "interrupted" and store.get_job(first)["error"] == "engine restarted"
    assert store.get_job(second)["status"] == "queued"
    assert store.get_run(run)["status"] == "interrupted"  # one job still waits, but nothing runs it (a power cut)
    store.finish_job(second, "succeeded")
    assert store.get_run(run)["status"] == "interrupted"
    store.update_job(second, status="running")  # plain updates do not refresh; the helper does
    assert store.get_run(run)["status"] == "interrupted" and store.refresh_run_status(run) == "running"


def _claim_until_empty(path: str, start_at: float) -> list[tuple[int, float]]:
    """Worker process: claim and finish jobs until none is left; return (job id, claim time) pairs."""
    store = Store(path)
    time.sleep(max(0.0, start_at - time.time()))  # all workers start claiming together
    claimed, idle_since = [], None
    while True:
        job = store.claim_job(pid=os.getpid())
        if job is None:
            # Nothing runnable now; jobs may be waiting for a dependency another worker is finishing.
            if not store.list_jobs(status=["queued", "running"]):
                break
            idle_since = idle_since or time.time()
            assert time.time() - idle_since < 20, "stuck"
            time.sleep(0.005)
            continue
        idle_since = None
        claimed.append((job["id"], job["started_at"]))
        time.sleep(0.003)  # a little "work" so claims overlap
        store.finish_job(job["id"], "succeeded")
    store.close()
    return claimed


def test_concurrent_claims_from_processes_never_double_claim(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with Store(path) as store:
        run = store.create_run("r", {})
        pairs = []
        for _ in range(40):  # 80 jobs: 40 roots, each with one dependant
            root = store.add_job(run, "sft")
            pairs.append((root, store.add_job(run, "evaluate", depends_on=[root])))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        start_at = time.time() + 1.5
        per_worker = pool.starmap(_claim_until_empty, [(str(path), start_at)] * 4)

    claims = [job_id for worker in per_worker for job_id, _ in worker]
    assert len(claims) == len(set(claims)) == 80  # every job exactly once
    assert sum(1 for worker in per_worker if worker) >= 2  # the claims really were concurrent
    with Store(path) as store:
        jobs = {job["id"]: job for job in store.list_jobs()}
        assert all(job["status"] == "succeeded" and job["attempt"] == 1 for job in jobs.values())
        for root, dependant in pairs:  # no dependant was claimed before its root had finished
            assert jobs[dependant]["started_at"] >= jobs[root]["ended_at"]


def test_a_claim_that_waited_for_the_lock_is_stamped_after_the_finish_it_waited_for(tmp_path: Path) -> None:
    """CI once saw a dependant's started_at 14 ms before its root's ended_at: the claimer read the clock before
    waiting for the write lock. Here a second connection holds the lock while the claimer waits."""
    path = tmp_path / "shared.db"
    holder, claimer = Store(path), Store(path)
    run = holder.create_run("r", {})
    root = holder.add_job(run, "sft")
    dependant = holder.add_job(run, "evaluate", depends_on=[root])
    assert holder.claim_job()["id"] == root
    claimed: list[dict | None] = []
    with holder._write():  # the lock is held: the claimer below must wait
        thread = threading.Thread(target=lambda: claimed.append(claimer.claim_job()))
        thread.start()
        time.sleep(0.3)
        holder.finish_job(root, "succeeded")
    thread.join(timeout=30)
    assert claimed and claimed[0]["id"] == dependant
    assert claimed[0]["started_at"] >= holder.get_job(root)["ended_at"]
    holder.close(), claimer.close()


def test_store_shared_by_threads(store: Store) -> None:
    job = store.add_job(store.create_run("r", {}), "sft")
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for step in range(40):
                store.log_metrics(job, offset * 1000 + step, {"loss": 1.0, "lr": 0.1})
                store.metrics(job_id=job, names=["loss"])
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(store.metrics(job_id=job)) == 6 * 40 * 2


# ---- run status ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jobs, expected", [
    ([], "queued"),
    (["queued", "queued"], "queued"),
    (["succeeded", "queued"], "running"),
    (["running", "failed"], "running"),
    (["failed", "queued"], "failed"),
    (["succeeded", "failed", "skipped"], "failed"),
    (["succeeded", "succeeded"], "succeeded"),
    (["succeeded", "interrupted", "cancelled"], "interrupted"),
    (["succeeded", "interrupted", "queued"], "interrupted"),  # after a power cut nothing runs the queued ones
    (["succeeded", "cancelled", "skipped"], "cancelled"),
    (["succeeded", "skipped"], "failed"),
])
def test_derive_run_status(jobs: list[str], expected: str) -> None:
    assert derive_run_status(jobs, "queued") == expected


# ---- metrics, evals, artifacts ---------------------------------------------------------------------------------------

def test_metrics_round_trip_resume_and_since_id(store: Store) -> None:
    run = store.create_run("r", {})
    job, other = store.add_job(run, "sft"), store.add_job(run, "qat")
    store.log_metrics(other, 1, {"loss": math.nan, "grad_norm": math.inf})
    for step in range(1, 6):  # logged last, so the rows a resume deletes hold the highest ids
        store.log_metrics(job, step, {"loss": 1.0 / step, "lr": 0.01}, time=100.0 + step)
    rows = store.metrics(run_id=run)
    assert [(r["job_id"], r["step"]) for r in rows][:2] == [(job, 1), (job, 1)] and rows[-1]["job_id"] == other
    losses = store.metrics(job_id=job, names=["loss"])
    assert [r["value"] for r in losses] == [1.0, 0.5, 1.0 / 3, 0.25, 0.2] and losses[0]["time"] == 101.0
    assert [r["value"] for r in store.metrics(job_id=other)] == [None, None]  # non-finite -> NULL

    last_seen = max(r["id"] for r in rows)
    assert store.delete_metrics_after(job, 3) == 4  # steps 4 and 5, two names each
    store.log_metrics(job, 4, {"loss": 0.3})  # resumed run re-logs step 4
    fresh = store.metrics(run_id=run, since_id=last_seen)
    assert [(r["step"], r["value"]) for r in fresh] == [(4, 0.3)]  # ids are never reused
    with pytest.raises(StorageError, match="not a number"):
        store.log_metrics(job, 9, {"loss": "high"})
    assert len(store.metrics(job_id=job)) == 7  # the failed call wrote nothing


def test_eval_upsert_and_examples(store: Store) -> None:
    run = store.create_run("r", {})
    store.put_eval(run, None, "ptq", "mxfp4", {"acc": 0.5})
    store.put_eval(run, 7, "ptq", "mxfp4", {"acc": 0.6})
    store.put_eval(run, 8, "qat", "mxfp4", {"acc": 0.7})
    assert [(e["stage"], e["job_id"], e["metrics"]) for e in store.evals(run)] == [
        ("ptq", 7, {"acc": 0.6}), ("qat", 8, {"acc": 0.7})]

    store.add_eval_examples([
        {"run_id": run, "job_id": 8, "stage": "qat", "fmt": "mxfp4", "task": "gsm8k", "idx": i,
         "prompt": f"q{i}", "reference": "4", "completion": "4", "passed": i % 2 == 0, "detail": {"i": i}}
        for i in (2, 0, 1)])
    rows = store.eval_examples(run, stage="qat", task="gsm8k")
    assert [(r["idx"], r["passed"], r["detail"]) for r in rows] == [(0, 1, {"i": 0}), (1, 0, {"i": 1}),
                                                                    (2, 1, {"i": 2})]
    assert len(store.eval_examples(run, limit=2)) == 2 and store.eval_examples(run, fmt="nvfp4") == []


def test_sha256_of_file_and_directory(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "a.bin").write_bytes(b"\x00" * 3_000_000)  # spans several 1 MiB chunks
    (model / "sub" / "b.json").write_text("{}")
    assert sha256_path(model / "a.bin") == (hashlib.sha256(b"\x00" * 3_000_000).hexdigest(), 3_000_000)
    digest, size = sha256_path(model)
    assert size == 3_000_002 and sha256_path(model) == (digest, size)

    (model / "sub" / "b.json").write_text("{]")  # one byte changes
    changed = sha256_path(model)[0]
    (model / "sub" / "b.json").rename(model / "sub" / "c.json")  # same bytes, other name
    renamed = sha256_path(model)[0]
    assert len({digest, changed, renamed}) == 3


def test_artifacts(store: Store, tmp_path: Path) -> None:
    run = store.create_run("r", {})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.safetensors").write_bytes(b"weights")
    computed = store.add_artifact(run, None, "checkpoint", str(tmp_path / "ckpt"), meta={"fmt": "bf16"})
    given = store.add_artifact(run, None, "export", str(tmp_path / "ckpt"), sha256="abc")
    rows = {row["id"]: row for row in store.artifacts(run_id=run)}
    assert rows[computed]["sha256"] == sha256_path(tmp_path / "ckpt")[0] and rows[computed]["bytes"] == 7
    assert rows[computed]["meta"] == {"fmt": "bf16"}
    assert (rows[given]["sha256"], rows[given]["bytes"]) == ("abc", 7)
    assert [row["id"] for row in store.artifacts(kind="export")] == [given]
    with pytest.raises(StorageError, match="no such file"):
        store.add_artifact(run, None, "export", str(tmp_path / "missing"))


def test_delete_run_cascades(store: Store, tmp_path: Path) -> None:
    keep, doomed = store.create_run("keep", {}), store.create_run("doomed", {})
    for run in (keep, doomed):
        job = store.add_job(run, "sft")
        store.log_metrics(job, 1, {"loss": 1.0})
        store.put_eval(run, job, "sft", "bf16", {"acc": 1})
        store.add_eval_examples([{"run_id": run, "job_id": job, "stage": "sft", "fmt": "bf16", "idx": 0}])
        store.add_artifact(run, job, "log", str(tmp_path), sha256="x")
        store.add_telemetry({"util": 1}, run_id=run)
    server = store.add_server(run_id=doomed, backend="vllm", port=8000)
    store.delete_run(doomed)

    assert store.get_run(doomed) is None and store.get_run(keep) is not None
    assert {j["run_id"] for j in store.list_jobs()} == {keep}
    assert {m["run_id"] for m in store.metrics()} == {keep}
    assert store.evals(doomed) == [] and store.eval_examples(doomed) == [] and store.artifacts(doomed) == []
    assert sorted(t["run_id"] or "" for t in store.telemetry()) == ["", keep]  # telemetry kept, run_id nulled
    assert store.list_servers()[0]["id"] == server and store.list_servers()[0]["run_id"] is None


# ---- telemetry, engines, servers (secrets: tests/test_storage_secrets.py) -----------------------------------------

def test_telemetry_window(store: Store) -> None:
    for second in range(10):
        store.add_telemetry({"gpu_util": second}, time=1000.0 + second)
    newest = store.telemetry(limit=3)
    assert [row["sample"]["gpu_util"] for row in newest] == [7, 8, 9]  # newest three, oldest first
    assert [row["time"] for row in store.telemetry(since=1007.5)] == [1008.0, 1009.0]
    assert store.prune_telemetry(before=1005.0) == 5 and len(store.telemetry()) == 5


def test_engine_liveness_by_heartbeat(store: Store) -> None:
    engine = store.register_engine(pid=42, host="box")
    assert [e["id"] for e in store.live_engines()] == [engine]
    store.db["engines"].update(engine, {"heartbeat_at": time.time() - 60})  # it stopped beating a minute ago
    assert store.live_engines(max_age_s=10) == [] and len(store.live_engines(max_age_s=120)) == 1
    store.engine_heartbeat(engine)
    assert len(store.live_engines()) == 1
    store.stop_engine(engine)
    assert store.live_engines() == [] and store.db["engines"].get(engine)["stopped_at"] is not None


def test_servers(store: Store) -> None:
    first = store.add_server(model_path="/m", backend="transformers", host="127.0.0.1", port=8000, pid=5)
    second = store.add_server(model_path="/n", backend="vllm", port=8001)
    store.update_server(first, status="running")
    assert [s["id"] for s in store.list_servers(status="running")] == [first]
    assert [s["id"] for s in store.list_servers()] == [first, second]
    assert store.list_servers(status="starting")[0]["started_at"] is not None
