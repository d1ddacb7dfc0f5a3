"""Per-job timing (engine/runtime/job_timing.py): real job processes record where their time went, and `status` and
the History tab show it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_real_checkpoint import make_mxfp4_checkpoint, make_small_data, recipe_for

from engine.runtime import job_timing
from engine.runtime.job_timing import JobTiming, format_timing
from storage import Store
from tests.helpers import launch

REPO = Path(__file__).resolve().parents[1]


def test_phases_add_up(tmp_path):
    timing = JobTiming(time.time() - 1.0, tmp_path)
    timing.stage_begins()
    with timing.phase("load"):
        time.sleep(0.2)
    (tmp_path / "written.bin").write_bytes(b"x" * 1024 * 1024)
    with timing.phase("save"):
        time.sleep(0.1)
    timing.stage_ends()
    result = timing.result()
    assert result["start_imports_s"] >= 1.0 and result["load_s"] >= 0.2 and result["save_s"] >= 0.1
    parts = result["start_imports_s"] + result["load_s"] + result["compute_s"] + result["save_s"]
    assert abs(parts - result["total_s"]) < 0.05
    assert result["disk_written_gib"] == round(1 / 1024, 3) and result["peak_gpu_gib"] is None
    with pytest.raises(ValueError, match="unknown phase"):
        with timing.phase("train"):
            pass
    assert "load 0.2 s" in format_timing(result) and format_timing(None) == ""
    gpu = format_timing({**result, "peak_gpu_gib": 40.25, "peak_gpu_reserved_gib": 61.0})
    assert "peak GPU 40.2 GiB (reserved 61.0)" in gpu or "peak GPU 40.3 GiB (reserved 61.0)" in gpu


def test_only_a_process_s_first_job_pays_for_its_start():
    first = job_timing.job_start_time({"started_at": time.time()}, chained=False)
    assert first < time.time() - 0.5  # this pytest process started well before (imports of torch and the tests)
    claimed_at = time.time() - 3.0
    assert job_timing.job_start_time({"started_at": claimed_at}, chained=True) == claimed_at  # its claim


def test_job_processes_record_timing_shown_by_status_and_history(tmp_path):
    """One job process: prepare, then the evaluation it chains into (engine/stages/job.py claim_next_job). The
    first job pays the interpreter's start; the chained one is timed from its claim, so the two do not overlap."""
    checkpoint = tmp_path / "gpt-oss-mxfp4"
    make_mxfp4_checkpoint(checkpoint)
    train, held_out = make_small_data(tmp_path, train=16, held_out=4)
    recipe = recipe_for(checkpoint, train, held_out, **{"eval.max_examples_per_task": 1, "eval.max_new_tokens": 4})
    workdir = tmp_path / "ws"
    workdir.mkdir()
    with Store(workdir / "studio.db") as store:
        run_id = store.create_run("timing", recipe.model_dump(mode="json"), run_dir=str(workdir / "runs" / "r"))
        prepare = store.add_job(run_id, "prepare", config={"key": "prepare"})
        store.add_job(run_id, "evaluate", target="prepare", config={"key": "evaluate:prepare"}, depends_on=[prepare])
        store.update_job(prepare, status="running")
        began = time.time()
        proc = subprocess.run([sys.executable, "-m", "engine.stages.job", "--workdir", str(workdir),
                               "--job", str(prepare)], cwd=REPO, capture_output=True, text=True, timeout=600)
        lifetime = time.time() - began
        assert proc.returncode == 0, proc.stdout + proc.stderr
        jobs = {j["config"]["key"]: j for j in store.list_jobs(run_id)}
        timings = {key: job["timing"] for key, job in jobs.items()}

    assert all(job["status"] == "succeeded" for job in jobs.values()), jobs
    for key, timing in timings.items():
        assert timing["compute_s"] > 0 and timing["peak_gpu_gib"] is None
        parts = sum(timing[k] for k in ("start_imports_s", "load_s", "compute_s", "save_s"))
        assert abs(parts - timing["total_s"]) < 0.1, (key, timing)
    assert timings["prepare"]["start_imports_s"] > 0.5  # a fresh interpreter importing torch
    assert timings["prepare"]["load_s"] == 0  # it checks the checkpoint's files, loads no model
    assert timings["evaluate:prepare"]["load_s"] > 0  # it loads (and upcasts) the MXFP4 checkpoint
    chained = jobs["evaluate:prepare"]  # timed from its claim (jobs.started_at) to its end, not from the process start
    assert abs(timings["evaluate:prepare"]["total_s"] - (chained["ended_at"] - chained["started_at"])) < 0.5
    assert timings["prepare"]["total_s"] + timings["evaluate:prepare"]["total_s"] <= lifetime

    status = launch(["--workdir", str(workdir), "status", run_id], timeout=300)
    assert status.returncode == 0, status.stderr
    assert format_timing(timings["evaluate:prepare"]) in status.stdout

    from ui.state import AppState
    from ui.tab_history import timing_html

    html = timing_html(AppState(workdir).store(), run_id)
    assert "evaluate:prepare" in html and "compute s" in html and f"<td>{timings['prepare']['compute_s']}</td>" in html
