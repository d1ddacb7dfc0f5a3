"""The whole recipe headless (issue 2's acceptance), on the smoke recipe: every stage, both FP4 formats.

Uses the session's `resumed_run` (tests/conftest.py): the run whose SFT job was killed and resumed, so this also shows
that a resumed run ends in the same place as any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import launch

pytestmark = pytest.mark.slow


def test_run_prints_the_table_and_succeeds(resumed_run):
    store, run_id, info = resumed_run
    assert info["resume_returncode"] == 0, info["resume_stdout"][-3000:]
    out = info["resume_stdout"]
    assert f"run {run_id} succeeded" in out
    for label in ("original", "SFT", "SFT+PTQ (MXFP4)", "SFT+QAT (MXFP4)", "SFT+PTQ (NVFP4)", "SFT+QAT (NVFP4)"):
        assert label in out
    assert all(j["status"] == "succeeded" for j in store.list_jobs(run_id))


def test_summary_json_has_every_row_and_metric(resumed_run):
    store, run_id, _ = resumed_run
    summary = json.loads((Path(store.get_run(run_id)["run_dir"]) / "summary.json").read_text())
    assert summary["run_id"] == run_id
    rows = {(r["stage"], r["format"]): r["metrics"] for r in summary["rows"]}
    expected = [("original", "bf16"), ("sft", "bf16"), ("ptq", "mxfp4"), ("qat", "mxfp4"), ("ptq", "nvfp4"),
                ("qat", "nvfp4")]
    assert list(rows) == expected
    for key, metrics in rows.items():
        for name in ("eval_loss", "pass_rate", "language_pass_rate", "refusal_pass_rate"):
            assert 0.0 <= metrics[name] < 100 if name == "eval_loss" else 0.0 <= metrics[name] <= 1.0, (key, name)
        quantized = key[1] != "bf16"
        assert ("weight_rel_error" in metrics) == quantized
        if quantized:  # FP4 on these weights loses something, and far less than everything
            assert 0.0 < metrics["weight_rel_error"] < 0.5
    assert set(summary["exports"]) == {"mxfp4", "nvfp4"}


def test_exports_are_verified_fp4_checkpoints(resumed_run):
    store, run_id, _ = resumed_run
    exports = {a["meta"]["format"]: a for a in store.artifacts(run_id, kind="export")}
    for fmt, artifact in exports.items():
        assert artifact["meta"]["verified"] is True and artifact["meta"]["max_abs_diff"] == 0.0
        assert len(artifact["sha256"]) == 64
        assert artifact["meta"]["bytes"] < artifact["meta"]["bf16_bytes"]  # FP4 experts are smaller on disk
    config = json.loads((Path(exports["mxfp4"]["path"]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"


def test_training_metrics_and_logs_are_recorded(resumed_run):
    store, run_id, _ = resumed_run
    jobs = {j["config"]["key"]: j for j in store.list_jobs(run_id)}
    for key in ("sft", "qat:mxfp4", "qat:nvfp4"):
        names = {m["name"] for m in store.metrics(job_id=jobs[key]["id"])}
        assert {"loss", "learning_rate", "grad_norm", "eval_loss"} <= names, key
        assert Path(jobs[key]["log_path"]).stat().st_size > 0
    examples = store.eval_examples(run_id, stage="qat", fmt="mxfp4")
    assert len(examples) == 2 * store.get_run(run_id)["recipe"]["eval"]["max_examples_per_task"]
    samples = store.telemetry(run_id=run_id, limit=1000)  # the engine records it, no web app involved here
    assert len(samples) >= 3 and all("cpu_percent" in s["sample"] for s in samples)


def test_qat_trained_the_quantized_model(resumed_run):
    """QAT changed the weights, and the model it saved still carries its quantizers (modelopt state). PTQ kept only
    its quantizers and a pointer: its weights are SFT's (engine/training/stage_outputs.py)."""
    store, run_id, _ = resumed_run
    from engine.evaluation.evaluator import load_expert_weights

    run_dir = Path(store.get_run(run_id)["run_dir"])
    stage = json.loads((run_dir / "models" / "ptq-mxfp4" / "stage.json").read_text())
    assert stage["parent"] == "sft" and stage["adapter"] is None and not list((run_dir / "models" / "ptq-mxfp4").glob(
        "model*.safetensors"))
    ptq = load_expert_weights(run_dir / "models" / "sft")
    qat = load_expert_weights(run_dir / "models" / "qat-mxfp4")
    assert ptq.keys() == qat.keys() and any(not torch.equal(ptq[k], qat[k]) for k in ptq)
    assert (run_dir / "models" / "qat-mxfp4" / "modelopt_state.pth").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "assets/recipes/missing.yaml"], "recipe file not found"),
        (["run", "assets/recipes/smoke.yaml", "--data.source", "tests/fixtures/bad_data/malformed.jsonl"],
         "malformed.jsonl:"),
        (["run", "assets/recipes/smoke.yaml", "--sft.learning_rate", "-1"], "sft.learning_rate"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    workdir = tmp_path / "ws"
    proc = launch(["--workdir", str(workdir), *args], timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()
