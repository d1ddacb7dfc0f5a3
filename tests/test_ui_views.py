"""The app's pieces against a real workspace: it builds without heavy imports, the run views read real storage rows,
failed jobs show error + advice + log lines, uploads and deletions stay inside the workspace, and binding to the
network needs credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.recipe.configs import Recipe
from engine.runtime.pipeline import enqueue, job_key
from engine.runtime.workspace import REPO_ROOT, db_path
from storage import Store
from ui import run_data, views
from ui.app import is_loopback, launch_app, parse_auth
from ui.tab_dataset import sanitize_filename, save_upload
from ui.tab_history import remove_run_dir


def test_app_builds_without_torch_transformers_or_modelopt(workdir):
    code = ("import sys, time; from pathlib import Path; t = time.time(); from ui.app import build_app; "
            f"build_app(Path({str(workdir)!r})); "
            "heavy = [m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules]; "
            "print(heavy, round(time.time() - t, 1))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("[]"), out.stdout


@pytest.fixture
def run(workdir):
    store = Store(db_path(workdir))
    run_id = enqueue(store, Recipe(), workdir, cuda_available=False)
    return store, run_id


def jobs_by_key(store, run_id):
    return {job_key(j): j for j in store.list_jobs(run_id)}


def test_pipeline_cards_follow_job_states(run, workdir):
    store, run_id = run
    jobs = jobs_by_key(store, run_id)
    store.update_job(jobs["prepare"]["id"], status="running", started_at=time.time() - 5,
                     message="base_model x, train_rows 900, eval_rows 100")
    store.finish_job(jobs["prepare"]["id"], "succeeded")
    store.update_job(jobs["sft"]["id"], status="running", started_at=time.time(), progress=0.4)
    store.log_metrics(jobs["sft"]["id"], 4, {"loss": 2.5, "eval_loss": 2.25})
    store.put_eval(run_id, jobs["evaluate:original"]["id"], "original", "bf16", {"pass_rate": 0.25})
    cards = {c["title"]: c for c in run_data.pipeline_cards(store, run_id)}
    assert list(cards) == ["Dataset", "SFT", "PTQ", "QAT", "Evaluate", "Export", "Serve"]
    assert cards["Dataset"]["status"] == "succeeded" and cards["Dataset"]["headline"] == "900 train / 100 eval rows"
    assert cards["SFT"]["status"] == "running" and cards["SFT"]["progress"] == 0.4
    assert cards["SFT"]["headline"] == "eval loss 2.250"
    assert cards["PTQ"]["status"] == "queued"
    assert cards["Evaluate"]["headline"].endswith("best 25%")
    html = views.pipeline_html(list(cards.values()))
    assert html.count("class='card") == 7 and "eval loss 2.250" in html


def test_failed_job_shows_error_advice_and_log(run, workdir):
    store, run_id = run
    job = jobs_by_key(store, run_id)["sft"]
    log = workdir / "sft.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: CUDA out of memory\n")
    store.update_job(job["id"], status="running", log_path=str(log))
    store.finish_job(job["id"], "failed", error="OutOfMemoryError: CUDA out of memory -- The GPU ran out of memory. "
                     "Lower per_device_train_batch_size")
    problems = run_data.problem_jobs(store, run_id)
    assert [p["key"] for p in problems] == ["sft"]
    assert problems[0]["log_tail"].splitlines()[-1] == "RuntimeError: CUDA out of memory"
    assert len(problems[0]["log_tail"].splitlines()) == 40
    html = views.problems_html(problems)
    assert "OutOfMemoryError: CUDA out of memory" in html and "Lower per_device_train_batch_size" in html
    assert "line 99" in html and str(log) in html


def test_group_status_precedence():
    assert run_data.group_status([]) == "none"
    assert run_data.group_status(["succeeded", "queued"]) == "running"
    assert run_data.group_status(["succeeded", "failed", "queued"]) == "failed"
    assert run_data.group_status(["succeeded", "skipped"]) == "skipped"
    assert run_data.group_status(["succeeded", "succeeded"]) == "succeeded"
    assert run_data.group_status(["queued", "queued"]) == "queued"


def test_upload_names_are_sanitised_and_unique(workdir, tmp_path):
    assert sanitize_filename("../../etc/My Data (v2).JSONL") == "My_Data_v2.jsonl"
    assert sanitize_filename("..hidden.parquet") == "hidden.parquet"
    assert sanitize_filename("\u00fcber daten.jsonl") == "ber_daten.jsonl"
    source = tmp_path / "my data.jsonl"
    source.write_text('{"messages": []}\n')
    first, _ = save_upload(workdir, str(source))
    second, _ = save_upload(workdir, str(source))
    assert first.value == str(workdir / "uploads" / "my_data.jsonl")
    assert second.value == str(workdir / "uploads" / "my_data-2.jsonl")
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    assert "upload a .jsonl or .parquet" in save_upload(workdir, str(bad))[1]


def test_run_dir_removal_stays_inside_the_workspace(workdir, tmp_path):
    inside = workdir / "runs" / "r1"
    inside.mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    assert remove_run_dir(workdir, str(inside)) and not inside.exists()
    assert not remove_run_dir(workdir, str(outside)) and outside.exists()
    assert not remove_run_dir(workdir, str(workdir / "runs" / ".." / ".." / "precious")) and outside.exists()


def test_network_binding_needs_auth(workdir, tmp_path, capsys):
    assert launch_app(workdir, host="0.0.0.0", port=1) == 2
    assert "binding 0.0.0.0 exposes the app to the network; pass --auth user:pass or --auth FILE" in \
        capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("myhost")


def test_auth_parsing(tmp_path):
    assert parse_auth(None) is None
    assert parse_auth("ann:secret:with:colons") == [("ann", "secret:with:colons")]
    users = tmp_path / "users"
    users.write_text("# team\nann:one\n\nbob:two\n")
    assert parse_auth(str(users)) == [("ann", "one"), ("bob", "two")]
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("just-a-name")


def test_delete_run_asks_refuses_running_and_removes_its_directory(run, workdir):
    from ui.state import AppState
    from ui.tab_history import ask, delete, table

    store, run_id = run
    state = AppState(workdir)
    assert "cannot be undone" in ask(state, run_id)[1]
    refused = delete(state, run_id, run_id)
    assert "still running: cancel it first" in refused[0] and store.get_run(run_id)
    for job in store.list_jobs(run_id):
        store.finish_job(job["id"], "cancelled", error="test")
    run_dir = workdir / "runs" / run_id
    assert run_dir.is_dir()
    done = delete(state, run_id, run_id)
    assert f"Deleted run {run_id} and {run_dir}" in done[0]
    assert store.get_run(run_id) is None and not run_dir.exists()
    assert table(state).empty


def test_examples_side_by_side_and_changed_filter(run, workdir):
    from ui.state import AppState
    from ui.tab_evaluate import example_table, results_frame
    from engine.evaluation.results import summary

    store, run_id = run
    rows = []
    for stage, fmt, passes in (("sft", "bf16", [1, 1]), ("ptq", "mxfp4", [0, 1]), ("qat", "mxfp4", [1, 1])):
        store.put_eval(run_id, None, stage, fmt, {"pass_rate": sum(passes) / 2, "eval_loss": 1.0,
                                                  "task_pass_rate": sum(passes) / 2})
        rows += [{"run_id": run_id, "stage": stage, "fmt": fmt, "task": "task", "idx": i,
                  "prompt": "[developer] x [user] What is 2+2?", "reference": "4", "completion": "raw",
                  "passed": p, "detail": {"final": "4" if p else "5"}} for i, p in enumerate(passes)]
    store.add_eval_examples(rows)
    state = AppState(workdir)
    everything = example_table(state, run_id, "all tasks", "mxfp4", False)
    assert len(everything) == 2 and everything.iloc[0]["question"] == "What is 2+2?"
    assert everything.iloc[0]["SFT+PTQ MXFP4"] == "✗ 5" and everything.iloc[0]["SFT+QAT MXFP4"] == "✓ 4"
    changed = example_table(state, run_id, "all tasks", "mxfp4", True)
    assert list(changed["#"]) == [0]
    frame = results_frame(store, run_id, summary(store, run_id))
    assert list(frame.columns)[:2] == ["model", "task pass %"]
    assert "perplexity" in frame.columns and "expert weights" in frame.columns
    assert frame.iloc[0]["perplexity"] == "2.72"


def test_cancel_button_cancels_queued_jobs_and_resume_says_when_nothing_to_do(run, workdir):
    from ui.state import AppState
    from ui.tab_recipe import cancel_clicked, resume_clicked

    store, run_id = run
    state = AppState(workdir)
    assert "Nothing to resume" in resume_clicked(state, run_id)
    assert f"Cancelling {len(store.list_jobs(run_id))} jobs" in cancel_clicked(state, run_id)
    assert {j["status"] for j in store.list_jobs(run_id)} == {"cancelled"}
    assert store.get_run(run_id)["status"] == "cancelled"
    assert "No run selected" in cancel_clicked(state, None)

    from engine.runtime.worker import stop_engine
    from engine.runtime.workspace import checkpoint_dir

    saved = checkpoint_dir(Path(store.get_run(run_id)["run_dir"]), "sft") / "checkpoint-4"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    try:  # the notice says where each trainer continues: SFT from its checkpoint, QAT from step 0
        notice = resume_clicked(state, run_id)
    finally:
        stop_engine(workdir)
    assert "sft continues from checkpoint-4" in notice, notice
    assert "qat:mxfp4 no checkpoint yet: restarting from step 0" in notice, notice


def test_dataset_preview_recounts_an_edited_file(tmp_path):
    """The histogram's lengths follow the file: an edit that keeps the row count still changes them."""
    from ui import tab_dataset

    path = tmp_path / "chat.jsonl"

    def write(words: int, mtime_ns: int) -> None:
        rows = [{"messages": [{"role": "user", "content": "word " * words}, {"role": "assistant", "content": "ok"}]}
                for _ in range(3)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.utime(path, ns=(mtime_ns, mtime_ns))  # a distinct modification time, whatever the filesystem's clock

    write(2, 1_000_000_000_000_000_000)
    _, before = tab_dataset.preview(str(path), 0, 256)
    write(40, 2_000_000_000_000_000_000)
    tokens, after = tab_dataset.preview(str(path), 0, 256)
    assert len(before.data[0].x) == len(after.data[0].x) == 3
    assert min(after.data[0].x) > max(before.data[0].x) + 30
    assert "".join(text for text, _ in tokens).count("word") == 40  # the preview shows the edited row too


def test_fine_tune_survival_shows_in_the_table_and_the_compare_tab(run, workdir):
    from engine.evaluation.results import format_table, summary
    from ui.state import AppState
    from ui.tab_compare import layer_survival

    store, run_id = run
    tensor = "model.layers.0.mlp.experts.gate_up_proj"
    store.put_eval(run_id, None, "sft", "bf16", {"pass_rate": 0.9, "eval_loss": 1.0})
    for stage, erased in (("ptq", 0.94), ("qat", 0.12)):
        store.put_eval(run_id, None, stage, "mxfp4", {
            "pass_rate": 0.5, "eval_loss": 1.0, "finetune_erased_share": erased, "finetune_surviving_delta": 0.3,
            "per_tensor_finetune_survival": {tensor: {"erased_share": erased, "surviving_delta": 0.3, "changed": 9}}})
    table = format_table(summary(store, run_id))
    assert "fine-tune erased %" in table and "94.0" in table and "12.0" in table
    figure = layer_survival(AppState(workdir), [run_id])
    bars = {trace.name: list(trace.y) for trace in figure.data}
    assert bars == {"SFT+PTQ MXFP4": [0.94], "SFT+QAT MXFP4": [0.12]}, bars


def test_story_lines_say_what_ptq_lost_and_qat_recovered():
    from engine.evaluation.results import story_lines

    def row(stage, fmt, rate, ci):
        return {"stage": stage, "format": fmt, "metrics": {"pass_rate": rate, "pass_rate_ci95": ci}}

    data = {"rows": [row("sft", "bf16", 0.99, 0.01), row("ptq", "mxfp4", 0.89, 0.02), row("qat", "mxfp4", 0.98, 0.01),
                     row("ptq", "nvfp4", 0.985, 0.01), row("qat", "nvfp4", 0.99, 0.01)]}
    mx, nv = story_lines(data)
    assert mx.startswith("MXFP4: PTQ lost 10.0 ± 2.2 points") and "QAT recovered 90% of it" in mx
    assert nv.startswith("NVFP4: PTQ lost no measurable pass rate (+0.5 ± 1.4 points vs SFT)")
    assert "recovered" not in nv


def test_sft_tab_shows_what_runs_while_sft_waits(run, workdir):
    """The first run pre-trains the tiny model in `prepare` for ~2 min: the SFT tab shows that job's progress and
    log, not just 'queued'."""
    from ui.state import AppState
    from ui.training_view import refresh

    store, run_id = run
    prepare = jobs_by_key(store, run_id)["prepare"]
    log = workdir / "prepare.log"
    log.write_text("pretrain step 60/600 loss 3.210\n")
    store.update_job(prepare["id"], status="running", started_at=time.time(), progress=0.05, log_path=str(log),
                     message="preparing the embedded tiny gpt-oss (pre-trained once, then cached)")
    status, _, _, log_html, _ = refresh(AppState(workdir), "sft", run_id, {})
    assert "queued" in status and "waiting for" in status
    assert "prepare</b> 5% — preparing the embedded tiny gpt-oss" in status
    assert "pretrain step 60/600" in log_html
    store.update_job(prepare["id"], progress=0.3)
    assert "prepare</b> 30%" in refresh(AppState(workdir), "sft", run_id, {})[0]
    store.finish_job(prepare["id"], "succeeded")
    store.update_job(jobs_by_key(store, run_id)["sft"]["id"], status="running", started_at=time.time())
    assert "waiting for" not in refresh(AppState(workdir), "sft", run_id, {})[0]


def test_a_smoke_runs_zero_table_is_explained(workdir):
    """Recipe and Evaluate tabs say why the smoke recipe's pass rates are ~0: it trains a handful of steps."""
    from engine.recipe.files import load_recipe
    from ui import tab_evaluate, tab_recipe
    from ui.state import RECIPES_DIR, AppState

    store = Store(db_path(workdir))
    state = AppState(workdir)
    smoke = enqueue(store, load_recipe(RECIPES_DIR / "smoke.yaml"), workdir, cuda_available=False)
    store.put_eval(smoke, jobs_by_key(store, smoke)["evaluate:original"]["id"], "original", "bf16",
                   {"pass_rate": 0.0, "eval_loss": 4.3})
    shown = [str(v) for v in tab_recipe.refresh(state, smoke, {})]
    note = next(v for v in shown if "trained only" in v)
    assert "Recipe &#x27;smoke&#x27; trained only 8 SFT steps and 4 QAT steps, from a tiny base pre-trained for " \
           "40 steps" in note and "pass rates near 0% are expected" in note
    assert any("trained only 8 SFT steps" in str(v) for v in tab_evaluate.refresh(state, smoke, {}))
    demo = enqueue(store, load_recipe(RECIPES_DIR / "demo.yaml"), workdir, cuda_available=False)
    assert not any("trained only" in str(v) for v in tab_recipe.refresh(state, demo, {}))


def test_loss_charts_tick_whole_steps():
    """A 4-step QAT made plotly tick 0.5, 1, 1.5, ...: every step axis ticks whole numbers."""
    from ui import charts

    fig = charts.training_figure({"qat:mxfp4": {"loss": [[1, 2, 3, 4], [3.0, 2.9, 2.8, 2.7]],
                                                "eval_loss": [[2, 4], [3.1, 3.0]]}})
    axes = [getattr(fig.layout, name) for name in fig.layout if name.startswith("xaxis")]
    assert len(axes) == 5 and all(a.dtick == 1 and a.tickformat == "d" for a in axes)
    assert charts.step_ticks(list(range(0, 301, 5))) == {"tickformat": "d"}
    assert charts.step_ticks([0, 30])["dtick"] == 5
