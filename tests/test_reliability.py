"""Nothing is lost when processes die: real engine, real child processes, real SQLite file.

- a job killed mid-SFT (and the engine with it) comes back as 'interrupted', resumes from its last checkpoint and
  finishes with one metric row per step;
- a kill during a checkpoint save never leaves a directory that looks like a checkpoint;
the whole smoke recipe then runs to the end on the resumed run (tests/test_pipeline.py checks its results).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.runtime.workspace import NO_CHECKPOINT
from storage import Store
from tests.helpers import REPO, SMALL_EVAL_FLAGS, launch, stop_engines, wait_for

pytestmark = pytest.mark.slow


def metric_steps(store: Store, job_id: int, name: str = "loss") -> list[int]:
    return [row["step"] for row in store.metrics(job_id=job_id, names=[name])]


def test_killed_sft_job_resumes_with_continuous_metrics(resumed_run):
    """Run command, engine and job SIGKILLed (a power cut, no app): `status` says interrupted, `resume` finishes."""
    store, run_id, info = resumed_run
    sft = info["sft_job"]
    assert info["row_after_kill"] == "running"  # nothing was left alive to record it: only the CLI can tell
    assert info["status_returncode"] == 0
    sft_line = next(line.split() for line in info["status_stdout"].splitlines() if line.split()[:1] == [str(sft)])
    assert sft_line[2] == "interrupted", info["status_stdout"]
    assert info["status_after_restart"] == "interrupted"
    assert info["engine_rows"] == ["dead"]  # the killed engine's row no longer claims to run
    assert info["sft_niceness"] == 10
    assert "engine stopped" in (info["error_after_restart"] or "")
    assert info["resume_returncode"] == 0 and "sft: continues from checkpoint-" in info["resume_stdout"]
    assert info["killed_at_step"] > info["checkpoint_step"] >= 1
    job = store.get_job(sft)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    steps = metric_steps(store, sft)
    max_steps = store.get_run(run_id)["recipe"]["sft"]["max_steps"]
    assert steps == list(range(1, max_steps + 1))  # continuous: no gap, no duplicate from before the kill
    rows = [(row["step"], row["name"]) for row in store.metrics(job_id=sft)]
    assert len(rows) == len(set(rows))  # one row per step and name (the Trainer logs some names twice a step)
    log = Path(job["log_path"]).read_text()
    assert "resuming from" in log and f"checkpoint-{info['checkpoint_step']}" in log


def test_kill_during_checkpoint_save_leaves_no_half_checkpoint(tmp_path):
    """The child kills itself (SIGKILL) in the middle of writing its second checkpoint."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import GptOssConfig, GptOssForCausalLM, Trainer, TrainingArguments
        from engine.training.hf_trainer import atomic_trainer
        atomic = sys.argv[1] == "atomic"
        cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                           num_experts_per_tok=1, sliding_window=16, layer_types=["full_attention"])
        data = [{{"input_ids": torch.arange(8) % 64, "labels": torch.arange(8) % 64}}] * 8
        args = TrainingArguments(output_dir=sys.argv[2], max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                 report_to=[], use_cpu=True, save_total_limit=3)
        cls = atomic_trainer(Trainer) if atomic else Trainer
        trainer = cls(model=GptOssForCausalLM(cfg), args=args, train_dataset=data)
        original = trainer._save_rng_state
        def crash_on_second_save(output_dir):
            if trainer.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # the optimizer is written, trainer_state.json is not
            return original(output_dir)
        trainer._save_rng_state = crash_on_second_save
        trainer.train()
    """)
    results = {}
    for mode in ("atomic", "plain"):
        out = tmp_path / mode
        proc = subprocess.run([sys.executable, "-c", script, mode, str(out)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        results[mode] = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    from engine.training.hf_trainer import latest_checkpoint

    assert results["atomic"] == ["checkpoint-2"]  # the interrupted checkpoint-4 never appeared
    assert latest_checkpoint(tmp_path / "atomic").name == "checkpoint-2"
    # Negative control: transformers' own Trainer leaves a checkpoint-4 that is not complete.
    assert results["plain"] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "plain" / "checkpoint-4" / "trainer_state.json").exists()


def test_cancel_kills_the_whole_process_tree_and_marks_cancelled(tmp_path, shared_cache, small_demo_data,
                                                                  monkeypatch):
    """A cancelled job's process group is gone (the child and anything it started) and the job says so."""
    workdir = tmp_path / "ws"
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--no-wait", *small_demo_data,
                   "--sft.max_steps", "400", "--sft.save_steps", "1000"])
    assert proc.returncode == 0, proc.stderr
    store = Store(workdir / "studio.db")
    run_id = store.list_runs()[0]["id"]
    sft = next(j for j in store.list_jobs(run_id) if j["stage"] == "sft")
    wait_for(lambda: metric_steps(store, sft["id"]), timeout=300, what="SFT to log a step")
    pid = store.get_job(sft["id"])["pid"]
    assert launch(["--workdir", str(workdir), "cancel", run_id]).returncode == 0
    wait_for(lambda: store.get_job(sft["id"])["status"] == "cancelled", timeout=60, what="the job to be cancelled")
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    later = [j for j in store.list_jobs(run_id) if j["id"] > sft["id"]]
    assert later and all(j["status"] == "cancelled" and j["started_at"] is None for j in later), later
    assert store.get_run(run_id)["status"] == "cancelled"
    stop_engines(store)


def test_cancel_or_stop_before_a_checkpoint_restarts_from_step_0_with_each_step_once(tmp_path, shared_cache,
                                                                                      small_demo_data, monkeypatch):
    """SFT cancelled before its first checkpoint, resumed, then stopped by `launch.py stop` (the engine exits, the
    job becomes interrupted), resumed again: each resume says it restarts from step 0 and drops the lost steps'
    metric rows, so the loss curve has every step once."""
    workdir = tmp_path / "ws"
    monkeypatch.setenv("QAT_STUDIO_CACHE", str(shared_cache))
    proc = launch(["--workdir", str(workdir), "run", "assets/recipes/smoke.yaml", "--no-wait", "--sft.max_steps", "24",
                   "--sft.save_steps", "1000", "--ptq.formats", "mxfp4", "--qat.max_steps", "2", *small_demo_data,
                   *SMALL_EVAL_FLAGS])
    assert proc.returncode == 0, proc.stderr
    store = Store(workdir / "studio.db")
    run_id = store.list_runs()[0]["id"]
    sft = next(j for j in store.list_jobs(run_id) if j["stage"] == "sft")["id"]
    cli = ["--workdir", str(workdir)]
    try:
        wait_for(lambda: len(metric_steps(store, sft)) >= 2, timeout=600, what="SFT to log two steps")
        assert launch([*cli, "cancel", run_id]).returncode == 0
        wait_for(lambda: store.get_job(sft)["status"] == "cancelled", timeout=60, what="the cancel")
        resumed = launch([*cli, "resume", run_id, "--no-wait"])
        assert "sft: no checkpoint yet: restarting from step 0" in resumed.stdout, resumed.stdout

        def retrained_two_steps() -> bool:  # the second attempt dropped the old rows and logged two of its own
            job = store.get_job(sft)
            log = Path(job["log_path"]).read_text() if job["log_path"] else ""
            return job["attempt"] == 2 and NO_CHECKPOINT in log and len(metric_steps(store, sft)) >= 2

        wait_for(retrained_two_steps, timeout=300, what="SFT to train two steps again")
        stopped = launch([*cli, "stop"])
        assert stopped.returncode == 0 and "stopped engine pid" in stopped.stdout, stopped.stdout + stopped.stderr
        assert not store.live_engines() and store.get_job(sft)["status"] == "interrupted"
        assert "interrupted" in launch([*cli, "status", run_id]).stdout
        assert metric_steps(store, sft) == list(range(1, len(metric_steps(store, sft)) + 1))  # no step twice

        final = launch([*cli, "resume", run_id], timeout=1500)
        assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
        assert "sft: no checkpoint yet: restarting from step 0" in final.stdout
        assert f"({NO_CHECKPOINT})" in final.stdout  # in the job's progress message, as `run`/`resume` watch it
        job = store.get_job(sft)
        assert job["status"] == "succeeded" and job["attempt"] == 3
        assert metric_steps(store, sft) == list(range(1, 25))
        assert Path(job["log_path"]).read_text().count(f"{NO_CHECKPOINT} (dropped") == 2
    finally:
        stop_engines(store)
