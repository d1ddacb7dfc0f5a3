"""The recipe advisor (engine/training/recipe_advisor.py): each warning fires for its case only and says why; the QAT recovery rule."""

from __future__ import annotations

from engine.training.recipe_advisor import planned_steps, qat_recovery, recipe_advice
from engine.recipe.configs import Recipe
from engine.recipe.files import load_recipe
from ui.state import RECIPES_DIR

DEMO = load_recipe(RECIPES_DIR / "demo.yaml")


def titles(advice) -> str:
    return " | ".join(a.title for a in advice)


def test_shipped_recipes_get_no_warnings():
    assert recipe_advice(DEMO) == []
    assert recipe_advice(Recipe()) == []  # NVIDIA's defaults: QAT lr 1e-5 is half the SFT lr 2e-5


def test_qat_without_sft():
    recipe = DEMO.model_copy(deep=True)
    recipe.sft.enabled = False
    advice = recipe_advice(recipe)
    assert "QAT without a prior SFT stage" in titles(advice)
    assert "markedly worse" in advice[0].reason
    assert "without a prior SFT" in titles(recipe_advice(DEMO, has_sft=False))  # an existing run lacking SFT


def test_qat_lr_not_well_below_sft_lr():
    recipe = DEMO.model_copy(deep=True)
    recipe.qat.learning_rate = recipe.sft.learning_rate
    advice = recipe_advice(recipe)
    assert "not well below" in titles(advice)
    assert "1e-5 for QAT, half its full-SFT 2e-5" in advice[0].reason
    assert recipe_advice(DEMO, sft_lr=DEMO.qat.learning_rate * 1.5)  # the run's SFT lr counts, not the draft's


def test_small_calibration_set():
    recipe = DEMO.model_copy(deep=True)
    recipe.ptq.calib_size = 16
    assert "calibration set of 16" in titles(recipe_advice(recipe))
    assert "calibration set of 40" in titles(recipe_advice(DEMO, train_rows=40))  # capped by the data size


def test_calibration_from_other_data():
    advice = recipe_advice(DEMO, sft_data="embedded:language")
    assert "differs from the SFT training data" in titles(advice)
    assert recipe_advice(DEMO, sft_data=DEMO.data.source) == []


def test_qat_steps_range_only_for_real_models():
    recipe = DEMO.model_copy(deep=True)
    recipe.qat.max_steps = 60
    assert recipe_advice(recipe) == []  # embedded tiny model: exempt
    recipe.model.source = "openai/gpt-oss-20b"
    assert "outside 500-2000" in titles(recipe_advice(recipe))
    recipe.qat.max_steps = 1000
    assert recipe_advice(recipe) == []
    recipe.qat.max_steps = -1
    recipe.qat.num_train_epochs = 1
    assert planned_steps(recipe, train_rows=160_000) == 160_000 // 16  # batch 16 x accumulation 1
    assert "10000 steps" in titles(recipe_advice(recipe, train_rows=160_000))
    assert recipe_advice(recipe) == []  # unknown data size: no guess


def test_disabled_qat_needs_no_advice():
    recipe = DEMO.model_copy(deep=True)
    recipe.qat.enabled = False
    recipe.ptq.calib_size = 1
    assert recipe_advice(recipe) == []


def test_qat_recovery_rule():
    assert not qat_recovery(None, [(10, 1.0)]).recovered
    assert "waiting" in qat_recovery(1.0, []).message
    recovering = qat_recovery(1.0, [(10, 1.5), (20, 1.3), (30, 1.2)])
    assert not recovering.recovered and not recovering.plateaued
    improving = qat_recovery(1.0, [(10, 1.3), (20, 1.1), (30, 1.01)])
    assert improving.recovered and not improving.plateaued
    done = qat_recovery(1.0, [(10, 1.2), (20, 1.012), (30, 1.008), (40, 1.005)])
    assert done.recovered and done.plateaued and "plateaued" in done.message
    stuck = qat_recovery(1.0, [(10, 1.2), (20, 1.201), (30, 1.2)])
    assert stuck.plateaued and not stuck.recovered and "above the SFT level" in stuck.message
    assert qat_recovery(1.0, [(10, None), (20, 0.9)]).recovered  # missing values are ignored
