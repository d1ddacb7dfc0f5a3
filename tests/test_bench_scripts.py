"""Every benchmark script says, in its --help, what it measures and where the result goes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime.workspace import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_says_what_it_measures_and_where_the_result_goes(script):
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "usage:" in text
    result = text[text.index("Result:"):] if "Result:" in text else ""
    assert result, f"{script.name} --help does not say where its result goes (a 'Result:' line)"


def test_device_script_lists_its_steps_and_refuses_unknown_ones():
    listed = subprocess.run(["bash", "bench/device.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 2 and "qat-step" in listed.stdout and "gpu-tests" in listed.stdout
    bad = subprocess.run(["bash", "bench/device.sh", "no-such-step"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=30, env={"OUT": "/tmp/device-sh-test", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "unknown step 'no-such-step'" in bad.stderr


# ------------------------------------------------ bench/lib/grid.py (demo_study's --jobs / --budget-s)
# Workers must be top-level functions: grid.run spawns processes, which import them by name.

def _all_at_once(setting: dict, context) -> dict:
    """Marks itself started, then waits until every setting of the grid has started: finishes only if they all
    run at the same time, in different processes."""
    folder = Path(setting["folder"])
    (folder / f"started-{setting['n']}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while len(list(folder.glob("started-*"))) < setting["of"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the settings did not run concurrently")
        time.sleep(0.05)
    if setting["n"] == 1:
        raise ValueError("setting 1 is bad")
    return {"n": setting["n"], "pid": os.getpid(), "context": context}


def _context(index: int, tag: str) -> str:
    return f"{tag}-{index}"


def _sleep(setting: dict, context) -> dict:
    from bench.lib import grid

    Path(setting["folder"], f"pid-{setting['n']}").write_text(str(os.getpid()))
    grid.progress({"n": setting["n"], "so_far": "slept 0 s"})
    time.sleep(setting["seconds"])
    return {"n": setting["n"]}


def test_grid_runs_settings_concurrently_in_worker_processes_and_reports_failures(tmp_path):
    from bench.lib import grid

    settings = [{"n": n, "of": 3, "folder": str(tmp_path)} for n in range(3)]
    seen = []
    outcome = grid.run(settings, _all_at_once, jobs=3, init=_context, init_args=("w",),
                       on_result=lambda s, r: seen.append(r["n"]), log=lambda m: None)
    assert sorted(seen) == [0, 2] and sorted(r["n"] for _, r in outcome.done) == [0, 2]
    pids = {r["pid"] for _, r in outcome.done}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {r["context"] for _, r in outcome.done} <= {"w-0", "w-1", "w-2"}
    [(bad, trace)] = outcome.failed
    assert bad["n"] == 1 and "setting 1 is bad" in trace
    assert not outcome.running and not outcome.not_started and not outcome.out_of_budget


def test_grid_budget_kills_running_workers_and_keeps_what_finished_and_their_progress(tmp_path):
    from bench.lib import grid

    settings = [{"n": n, "seconds": s, "folder": str(tmp_path)} for n, s in enumerate([0, 600, 600, 0])]
    started = time.monotonic()
    outcome = grid.run(settings, _sleep, jobs=2, budget_s=20, log=lambda m: None)
    assert time.monotonic() - started < 60
    assert outcome.out_of_budget and not outcome.failed
    assert [s["n"] for s, _ in outcome.done] == [0] and [s["n"] for s in outcome.running] == [1, 2]
    assert [s["n"] for s in outcome.not_started] == [3]
    assert [(s["n"], r) for s, r in outcome.partial] == [(n, {"n": n, "so_far": "slept 0 s"}) for n in (1, 2)]
    for n in (1, 2):  # the workers running the 600 s settings are gone
        pid = int((tmp_path / f"pid-{n}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_study_grid_flags(capsys):
    from bench import demo_study

    args = demo_study.parse_args(["--shapes", "e4k2,e16k2", "--bases", "mxfp4", "--sft-lrs", "3e-4,1e-3",
                                  "--sft-steps", "300,900", "--qat-lrs", "2e-4,5e-5", "--seeds", "1,2",
                                  "--formats", "mxfp4,nvfp4", "--jobs", "8", "--budget-s", "520"])
    recipe = demo_study.recipe_of(REPO_ROOT / "assets/recipes/demo.yaml")
    settings = demo_study.settings_of(args, recipe)
    keys = {(s["shape"], s["sft_lr"], s["sft_steps"], s["qat_lr"], s["seed"]) for s in settings}
    assert len(settings) == len(keys) == 2 * 2 * 2 * 2 * 2
    assert [s["seed"] for s in settings[:16]] == [1] * 16  # a seed's grid is queued before the next seed's
    assert settings[0]["shape"] == "e16k2" and settings[0]["sft_steps"] == 900  # the slowest first
    assert all(s["formats"] == ["mxfp4", "nvfp4"] and s["base"] == "mxfp4" and s["smoke_eval"] is None
               for s in settings)
    default = demo_study.settings_of(demo_study.parse_args([]), recipe)
    assert [(s["sft_steps"], s["qat_lr"], s["seed"]) for s in default] == [
        (recipe.sft.max_steps, recipe.qat.learning_rate, recipe.sft.seed)] * 2  # one per base, the recipe's values
    for bad, message in ((["--sft-steps", "0"], "--sft-steps must be >= 1"), (["--formats", "int4"], "unknown"),
                         (["--qat-lrs", "fast"], "not a comma list of float"), (["--jobs", "0"], "--jobs must be"),
                         (["--budget-s", "-1"], "must be > 0")):
        with pytest.raises(SystemExit) as exited:
            demo_study.parse_args(bad)
        assert exited.value.code == 2 and message in capsys.readouterr().err, bad


def test_study_summary_applies_issue_13s_acceptance_and_shows_cut_off_models():
    import io

    from bench.lib import study_report

    def model(p: float) -> dict:
        return {"language": {"pass": p, "ci95": 0.02, "n": 600}, "answers_changed": 0}

    def result(control: float | None, lr: float) -> dict:
        models = {"sft": model(0.95), "ptq:mxfp4": model(0.85), "qat:mxfp4": model(0.94)}
        if control is not None:
            models["control:mxfp4"], models["control:unquantized"] = model(control), model(0.96)
        return {"shape": "e16k2", "base": "mxfp4", "sft_lr": lr, "sft_steps": 900, "qat_lr": 5e-5, "seed": 42,
                "formats": ["mxfp4"], "models": models, "seconds": 1.0, "partial": control is None}

    out = io.StringIO()
    study_report.print_summary([result(0.86, 3e-4), result(0.94, 5e-4), result(None, 2e-4)], out)
    rows = {line.split(" | ")[2]: line for line in out.getvalue().splitlines() if line.startswith("| e16k2")}
    assert rows["0.0003"].endswith("| 95.0 | 96.0 | 85.0 | 94.0 | 86.0 | +10.0 sep | 90 | 10 | YES |")
    assert rows["0.0005"].endswith("| 94.0 | +10.0 sep | 90 | 90 | no |")  # the control recovers too
    assert rows["0.0002"].endswith("| 95.0 | nan | 85.0 | 94.0 | nan | +10.0 sep | 90 | nan | no |")  # cut off before the control
    table = io.StringIO()
    study_report.print_table(result(None, 2e-4), table)
    assert "PARTIAL" in table.getvalue() and "control:mxfp4" not in table.getvalue()


def test_grid_stops_its_workers_when_interrupted_by_a_signal(tmp_path):
    """demo_study maps SIGTERM (what `timeout` sends) to KeyboardInterrupt: the workers die with the run."""
    import signal

    from bench import demo_study
    from bench.lib import grid

    previous = signal.signal(signal.SIGALRM, demo_study.interrupt)
    started = time.monotonic()
    try:
        signal.alarm(20)
        outcome = grid.run([{"n": 0, "seconds": 600, "folder": str(tmp_path)}], _sleep, jobs=1, log=lambda m: None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcome.interrupted and not outcome.done and time.monotonic() - started < 60
    pid_file = tmp_path / "pid-0"
    if pid_file.exists():  # the worker had started its setting: it must be gone
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_recipe_overrides_read_json_values_and_keep_other_strings():
    from bench.lib.overrides import parse_overrides

    assert parse_overrides(["sft.max_steps=50", "sft.learning_rate=1e-3", 'ptq.formats=["mxfp4"]',
                            "eval.batch_size=auto", "qat.enabled=false", "data.source=a=b.jsonl"]) == {
        "sft.max_steps": 50, "sft.learning_rate": 1e-3, "ptq.formats": ["mxfp4"], "eval.batch_size": "auto",
        "qat.enabled": False, "data.source": "a=b.jsonl"}
