"""Telemetry without a GPU (the CI machine has no NVIDIA driver): a sample with CPU/RAM/disk and a clear note, never an
exception; storing compact samples for running runs; the header's rendering of both cases."""

from __future__ import annotations

import os
import time

from engine.runtime import telemetry
from engine.runtime.workspace import db_path
from storage import Store
from ui import header


def test_sample_without_gpu_reports_cpu_ram_disk(workdir):
    sample = telemetry.sample(workdir)
    assert 0 <= sample["cpu_percent"] <= 100 and sample["cpu_count"] >= 1
    assert 0 < sample["ram_used_gb"] <= sample["ram_total_gb"]
    assert 0 < sample["disk_used_gb"] <= sample["disk_total_gb"]
    if not sample["gpus"]:
        assert sample["gpu_note"].startswith(telemetry.NO_GPU_NOTE + " (")
    html = header.render(sample)
    assert "CPU" in html and "RAM" in html and "Disk" in html
    if not sample["gpus"]:
        assert html.count("NVIDIA GPU") == 1 and "NVMLError" not in html and "LibraryNotFound" not in html


def test_disk_of_a_workspace_not_created_yet(tmp_path):
    sample = telemetry.sample(tmp_path / "not" / "there")
    assert sample["disk_total_gb"] > 0


def test_gpu_rendering_with_unsupported_readings():
    gpu = {"index": 0, "name": "H100", "util_percent": 97, "mem_used_gb": 40.0, "mem_total_gb": 80.0,
           "power_w": None, "power_limit_w": None, "temp_c": 61, "sm_clock_mhz": None,
           "processes": [{"pid": 123, "name": "python", "mem_gb": 39.5}]}
    sample = {"cpu_percent": 12.0, "cpu_count": 16, "ram_used_gb": 10.0, "ram_total_gb": 128.0,
              "disk_used_gb": 1.0, "disk_total_gb": 2.0, "gpus": [gpu], "gpu_note": None}
    html = header.render(sample)
    assert "GPU0" in html and "97%" in html and "40.0/80 GiB" in html and "n/a/n/a W" in html
    assert "123 python 39.5 GiB" in html
    compact = telemetry.compact(sample)
    assert compact["gpu0_util_percent"] == 97 and compact["gpu0_power_w"] is None


def test_record_telemetry_for_running_runs(workdir):
    store = Store(db_path(workdir))
    running = store.create_run("a", {})
    store.update_run(running, status="running")
    idle = store.create_run("b", {})
    assert telemetry.record_running(store, workdir) == [running]
    rows = store.telemetry(run_id=running)
    assert len(rows) == 1 and "cpu_percent" in rows[0]["sample"] and "ram_used_gb" in rows[0]["sample"]
    assert store.telemetry(run_id=idle) == []
    stored = telemetry.record_telemetry(store, idle, workdir=workdir)
    assert store.telemetry(run_id=idle)[0]["sample"] == stored


def test_recorder_thread_samples_periodically(workdir):
    store = Store(db_path(workdir))
    run_id = store.create_run("a", {})
    store.update_run(run_id, status="running")
    recorder = telemetry.Recorder(store, workdir, every_s=0.2)
    recorder.start()
    deadline = time.time() + 10
    while len(store.telemetry(run_id=run_id)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    recorder.stop()
    recorder.join(timeout=5)
    assert len(store.telemetry(run_id=run_id)) >= 2


def test_gpu_release_note_says_what_it_could_check():
    from engine.runtime.telemetry import gpu_release_note, gpus

    assert gpu_release_note({123}, []) == ""  # a CPU job: nothing to check
    found, note = gpus()
    if note:  # no NVIDIA driver here: the cancel says it could not check, rather than claiming release
        assert gpu_release_note({123}, [0], timeout=0) == f"GPU memory release not checked ({note})"
    else:  # a pid that is no process holds no memory
        assert gpu_release_note({2**22 + 7}, [found[0]["index"]], timeout=0).startswith("GPU memory released")


def test_gpu_readings_from_nvml_become_a_sample(fake_gpu, workdir):
    found, note = telemetry.gpus()
    assert note is None and found == [{
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "util_percent": 87, "mem_used_gb": 20.0, "mem_total_gb": 80.0,
        "power_w": 350.5, "power_limit_w": 700.0, "temp_c": 51, "sm_clock_mhz": 1980, "capability": (9, 0),
        "processes": [{"pid": os.getpid(), "name": telemetry._process_name(os.getpid()), "mem_gb": 3.0}]}]
    compact = telemetry.compact(telemetry.sample(workdir))
    assert compact["gpu0_util_percent"] == 87 and compact["gpu0_mem_used_gb"] == 20.0 and compact["gpu0_power_w"] == 350.5
    assert "GPU0" in header.render(telemetry.sample(workdir))


def test_run_telemetry_chart_names_its_series_with_units(fake_gpu, workdir):
    from ui import charts

    rows = [{"time": 1_700_000_000.0 + i, "sample": telemetry.compact(telemetry.sample(workdir))} for i in range(2)]
    figure = charts.telemetry_figure(rows)
    names = {trace.name: trace.yaxis for trace in figure.data}
    assert names == {"CPU %": "y", "GPU0 util %": "y", "RAM used (GiB)": "y2", "GPU0 mem used (GiB)": "y2"}
    assert [trace.y for trace in figure.data if trace.name == "GPU0 mem used (GiB)"] == [(20.0, 20.0)]


def test_gpu_release_note_names_a_process_still_holding_memory(fake_gpu):
    assert telemetry.gpu_release_note({os.getpid()}, [0], timeout=0) == \
        f"GPU memory still held after the cancel: pid {os.getpid()} on cuda:0"
    assert telemetry.gpu_release_note({os.getpid() + 1}, [0], timeout=0).startswith("GPU memory released")


def test_serving_reads_the_same_gpus(fake_gpu):
    from engine.serving.formats import detect_gpus, gpu_summary

    detect_gpus.cache_clear()
    try:
        assert detect_gpus() == ({"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": (9, 0),
                                  "memory_gb": 80.0},)
        assert gpu_summary() == "NVIDIA H100 80GB HBM3 (sm_90, 80.0 GiB)"
    finally:
        detect_gpus.cache_clear()  # later tests must see this machine's real GPUs (none on CI)
