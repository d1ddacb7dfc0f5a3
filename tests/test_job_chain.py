"""A job process runs the next ready jobs of its run (engine/stages/job.py: claim_next_job): imports once, a model
loaded for an evaluation reused by the export after it. Real engine, real processes, real SQLite.

What must still hold: every job its own status, log and outcome; a job that crashes inside a chain (here a real
SIGSEGV) marks only itself, the engine lives on and runs what is left in a fresh process; resume finishes the run.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from storage import Store
from tests.helpers import launch, stop_engines, wait_for

pytestmark = pytest.mark.slow


def test_a_crash_inside_a_chain_marks_only_that_job_and_the_run_goes_on(tmp_path, shared_cache, small_demo_data,
                                                                        monkeypatch):
    """Evaluations keep the smoke recipe's 12 answers per task but stop at 16 tokens (~3 s instead of ~8 s each, five
    of them): evaluate:sft still runs for seconds, and the test looks for it every 0.1 s."""
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    workdir = tmp_path / "ws"
    proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--no-wait", *small_demo_data,
                   "--ptq.formats", "mxfp4", "--sft.max_steps", "4", "--qat.max_steps", "2",
                   "--eval.max_new_tokens", "16"])
    assert proc.returncode == 0, proc.stderr
    store = Store(workdir / "studio.db")
    run_id = store.list_runs()[0]["id"]
    try:
        jobs = {j["config"]["key"]: j["id"] for j in store.list_jobs(run_id)}
        sft = store.get_job(jobs["sft"])

        def chained_eval_running():
            job = store.get_job(jobs["evaluate:sft"])
            first = store.get_job(jobs["sft"])
            return job if job["status"] == "running" and first["status"] == "succeeded" and job["pid"] else None

        victim = wait_for(chained_eval_running, timeout=600, what="evaluate:sft to start", every=0.1)
        sft = store.get_job(jobs["sft"])
        assert victim["pid"] == sft["pid"], "evaluate:sft should run in the process that trained SFT"
        os.kill(victim["pid"], signal.SIGSEGV)  # a real crash of the chained job's process

        wait_for(lambda: store.get_job(jobs["evaluate:sft"])["status"] not in ("running", "queued"), timeout=60,
                 what="the crash to be recorded")
        crashed = store.get_job(jobs["evaluate:sft"])
        assert crashed["status"] == "interrupted" and "SIGSEGV" in (crashed["error"] or ""), crashed
        assert store.get_job(jobs["sft"])["status"] == "succeeded"  # the job before it in that process is untouched

        # The engine lives on and runs the rest (nothing else depends on evaluate:sft) in a fresh process.
        wait_for(lambda: store.get_job(jobs["export:mxfp4"])["status"] in ("succeeded", "failed"), timeout=900,
                 what="the rest of the run")
        rest = [store.get_job(jobs[k]) for k in ("ptq:mxfp4", "qat:mxfp4", "evaluate:qat:mxfp4", "export:mxfp4")]
        assert all(j["status"] == "succeeded" for j in rest), [(j["config"]["key"], j["status"]) for j in rest]
        assert len({j["pid"] for j in rest}) == 1 and rest[0]["pid"] != sft["pid"]  # one new process took them all

        # Each job kept its own log, starting with its own header; the export reused the evaluated QAT model.
        for job in rest:
            text = Path(job["log_path"]).read_text()
            assert f"== job {job['id']} " in text
            assert all(f"== job {other['id']} " not in text for other in rest if other["id"] != job["id"])
        export_log = Path(rest[-1]["log_path"]).read_text()
        assert "reusing qat:mxfp4's model" in export_log

        resumed = launch(["--workdir", str(workdir), "resume", run_id], timeout=900)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert store.get_job(jobs["evaluate:sft"])["status"] == "succeeded"
        assert store.get_run(run_id)["status"] == "succeeded"
        # The report (no device, its own resource) was taken by the chain it waited for, not a process of its own.
        assert store.get_job(jobs["report"])["pid"] == store.get_job(jobs["evaluate:sft"])["pid"]
    finally:
        stop_engines(store)


def test_a_lora_run_chains_on_adapters_and_writes_no_model_copy(tmp_path, shared_cache, small_demo_data,
                                                                monkeypatch):
    """LoRA SFT and LoRA QAT through the engine: the stages keep adapters / quantizers with a pointer to their parent
    (engine/training/stage_outputs.py), and the chained process builds each model on the one it holds: the SFT model
    on the base the previous evaluation loaded, PTQ on that SFT model, its evaluation and QAT on the model PTQ kept,
    the export on the evaluated QAT model. The export still checks every expert weight against the QAT model."""
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    workdir = tmp_path / "ws"
    lora = [f"--{stage}.{flag}" if i == 0 else value for stage in ("sft", "qat")
            for flag, value in (("lora", "true"), ("lora_target_experts", "true")) for i in (0, 1)]
    proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--ptq.formats", "mxfp4", *lora,
                   "--sft.max_steps", "4", "--qat.max_steps", "2", *small_demo_data,
                   "--eval.max_examples_per_task", "2", "--eval.max_new_tokens", "8"], timeout=900)
    store = Store(workdir / "studio.db")
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run_id = store.list_runs()[0]["id"]
        jobs = {j["config"]["key"]: j for j in store.list_jobs(run_id)}
        assert all(j["status"] == "succeeded" for j in jobs.values()), {k: j["status"] for k, j in jobs.items()}
        chain = [k for k in jobs if k != "report"]
        assert len({jobs[k]["pid"] for k in chain}) == 1, {k: jobs[k]["pid"] for k in chain}  # one process
        assert "verified True" in jobs["export:mxfp4"]["message"]

        models = Path(store.get_run(run_id)["run_dir"]) / "models"
        parents = {"sft": "prepare", "ptq-mxfp4": "sft", "qat-mxfp4": "ptq:mxfp4"}
        for folder, parent in parents.items():
            assert not list((models / folder).rglob("model*.safetensors")), folder  # no copy of the model
            assert json.loads((models / folder / "stage.json").read_text())["parent"] == parent

        def log(key: str) -> str:
            return Path(jobs[key]["log_path"]).read_text()

        assert "building sft on prepare's model" in log("evaluate:sft")  # after evaluate:original loaded the base
        assert "reusing sft's model" in log("ptq:mxfp4")
        assert "reusing ptq:mxfp4's model" in log("evaluate:ptq:mxfp4")  # kept by PTQ itself (common.keep_model)
        assert "reusing ptq:mxfp4's model" in log("qat:mxfp4")
        assert "reusing qat:mxfp4's model" in log("export:mxfp4")
    finally:
        stop_engines(store)
