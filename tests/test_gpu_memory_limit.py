"""hardware.gpu_memory_limit_gib on CPU: the fraction torch is given, the validation message, the estimator's
available memory, the CLI flag and YAML key, and a real job process that logs the limit as ignored on CPU.
tests/test_gpu_memory_limit_gpu.py shows on a card that the cap holds."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.recipe.configs import Recipe
from engine.recipe.files import RecipeError, parse_recipe
from engine.runtime.gpu_memory import GIB, GpuMemoryLimitError, apply_limit, memory_fraction
from engine.runs import UserError

REPO = Path(__file__).resolve().parents[1]
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "mem_total_gb": 79.65}  # NVML's total for an H100 80GB, GiB
H200 = {"index": 1, "name": "NVIDIA H200", "mem_total_gb": 139.81}


def test_fraction_is_the_limit_over_the_card():
    h200 = int(139.81 * GIB)
    assert memory_fraction(79, h200) == pytest.approx(79 / 139.81)
    assert memory_fraction(140, 140 * GIB) == 1.0
    assert memory_fraction(0.5, 2 * GIB) == 0.25


@pytest.mark.parametrize("limit, words", [(0, "give a positive size"), (-4, "give a positive size"),
                                          (140, "more than the card has (139.81 GiB); lower it to at most 139.8,")])
def test_fraction_refuses_limits_the_card_cannot_take(limit, words):
    with pytest.raises(GpuMemoryLimitError) as err:
        memory_fraction(limit, int(139.81 * GIB))
    assert str(err.value).startswith("hardware.gpu_memory_limit_gib: ") and words in str(err.value)


def recipe_with(limit: float | None, **hardware) -> Recipe:
    return Recipe.model_validate({"hardware": {"gpu_memory_limit_gib": limit, **hardware}})


def test_validation_names_the_field_and_the_card():
    from engine.runs import check_gpu_memory_limit

    with pytest.raises(UserError) as err:
        check_gpu_memory_limit(recipe_with(100), cards=[H100])
    assert str(err.value) == ("hardware.gpu_memory_limit_gib: 100 GiB is more than GPU 0 (NVIDIA H100 80GB HBM3) has "
                              "(79.65 GiB); lower it to at most 79.6, or leave it empty to use the whole card")
    check_gpu_memory_limit(recipe_with(79), cards=[H100])  # fits: no error
    with pytest.raises(UserError, match="GPU 0"):  # no hardware.gpus: GPU 0, the H100
        check_gpu_memory_limit(recipe_with(100), cards=[H100, H200])
    check_gpu_memory_limit(recipe_with(100, gpus=[1]), cards=[H100, H200])  # the run's GPU is the H200
    with pytest.raises(UserError, match="GPU 0"):
        check_gpu_memory_limit(recipe_with(100, gpus=[0, 1], strategy="ddp", num_processes=2), cards=[H100, H200])
    check_gpu_memory_limit(recipe_with(1000, device="cpu"), cards=[H100])  # ignored on CPU


def test_without_the_card_validation_warns(caplog):
    from engine.runs import check_gpu_memory_limit

    with caplog.at_level(logging.WARNING, logger="engine.runs"):
        check_gpu_memory_limit(recipe_with(79, gpus=[3]), cards=[H100])
    assert "hardware.gpu_memory_limit_gib = 79 GiB not checked: GPU 3 not visible here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.runs"):
        check_gpu_memory_limit(recipe_with(None), cards=[])
        check_gpu_memory_limit(recipe_with(79, device="cpu"), cards=[])
    assert caplog.text == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path (tests/test_gpu_memory_limit_gpu.py: with one)")
def test_cli_flag_reaches_the_recipe_and_validation_warns_without_a_gpu(caplog):
    from cli.flags import overrides_from_args
    from engine.runs import load_and_validate
    from launch import build_parser

    args = build_parser().parse_args(["run", "assets/recipes/smoke.yaml", "--hardware.gpu_memory_limit_gib", "79"])
    overrides = overrides_from_args(args)
    assert overrides["hardware.gpu_memory_limit_gib"] == 79.0
    with caplog.at_level(logging.WARNING, logger="engine.runs"):
        recipe = load_and_validate(str(REPO / "assets/recipes/smoke.yaml"), overrides)
    assert recipe.hardware.gpu_memory_limit_gib == 79.0
    assert "hardware.gpu_memory_limit_gib = 79 GiB not checked: GPU 0 not visible here" in caplog.text


def test_yaml_key_and_its_bounds():
    recipe = parse_recipe("hardware:\n  gpu_memory_limit_gib: 79.5\n", "r.yaml")
    assert recipe.hardware.gpu_memory_limit_gib == 79.5
    assert parse_recipe("name: x\n", "r.yaml").hardware.gpu_memory_limit_gib is None
    with pytest.raises(RecipeError, match=r"r.yaml:2: hardware.gpu_memory_limit_gib: Input should be greater than 0"):
        parse_recipe("hardware:\n  gpu_memory_limit_gib: 0\n", "r.yaml")


def test_estimator_answers_for_the_capped_card():
    from engine.recipe.files import load_recipe
    from engine.training.estimate import estimate_recipe

    recipe = load_recipe(REPO / "assets/recipes/gpt-oss-20b-1gpu.yaml", {"model.source": "openai/gpt-oss-20b"})
    whole = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    recipe.hardware.gpu_memory_limit_gib = 79
    capped = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    assert (whole["available_gib"], capped["available_gib"]) == (141, 79) or torch.cuda.is_available()
    assert capped["available_gib"] == 79 and capped["available_source"].startswith("hardware.gpu_memory_limit_gib")
    assert capped["verdict"] == "fits" and capped["per_gpu_gib"] == whole["per_gpu_gib"]  # ~45 GiB of 79
    recipe.hardware.gpu_memory_limit_gib = 40  # below the ~45 GiB the LoRA SFT needs
    small = estimate_recipe(recipe, "sft", cuda=True, gpu_memory_gib=141)
    assert small["available_gib"] == 40 and small["verdict"] == "does not fit" and small["suggestions"]


def test_limit_is_ignored_on_cpu_with_a_line():
    assert apply_limit(None, torch.device("cpu")) is None
    line = apply_limit(79, torch.device("cpu"))
    assert line == ("hardware.gpu_memory_limit_gib = 79 GiB ignored: this job runs on cpu, the limit caps GPU memory "
                    "only")


def test_a_cpu_job_process_logs_the_limit_as_ignored(tmp_path):
    """A real job process (python -m engine.stages.job) of a run with the limit, on CPU: it says the limit does not
    apply and runs the job."""
    from test_real_checkpoint import make_mxfp4_checkpoint, make_small_data, recipe_for

    from storage import Store

    checkpoint = tmp_path / "gpt-oss-mxfp4"
    make_mxfp4_checkpoint(checkpoint)
    train, held_out = make_small_data(tmp_path, train=8, held_out=2)
    recipe = recipe_for(checkpoint, train, held_out, **{"hardware.gpu_memory_limit_gib": 79})
    workdir = tmp_path / "ws"
    workdir.mkdir()
    with Store(workdir / "studio.db") as store:
        run_id = store.create_run("limit", recipe.model_dump(mode="json"), run_dir=str(workdir / "runs" / "r"))
        prepare = store.add_job(run_id, "prepare", config={"key": "prepare"})
        store.update_job(prepare, status="running")
        proc = subprocess.run([sys.executable, "-m", "engine.stages.job", "--workdir", str(workdir),
                               "--job", str(prepare)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert store.get_job(prepare)["status"] == "succeeded"
    assert "hardware.gpu_memory_limit_gib = 79 GiB ignored: this job runs on cpu" in proc.stdout
