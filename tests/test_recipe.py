"""Recipe YAML <-> typed configs: defaults, overrides, and errors that name file, line and field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cli.flags import add_recipe_flags, leaf_fields, overrides_from_args
from engine.recipe.configs import Recipe
from engine.recipe.files import RecipeError, load_recipe, parse_recipe, recipe_to_yaml

DEMO = Path(__file__).resolve().parent.parent / "assets" / "recipes" / "demo.yaml"


def test_demo_recipe_loads_with_both_formats():
    recipe = load_recipe(DEMO)
    assert recipe.ptq.formats == ["mxfp4", "nvfp4"]
    assert recipe.qat.learning_rate < recipe.sft.learning_rate


def test_every_field_has_help_text():
    missing = [name for name, field in leaf_fields() if not field.description]
    assert missing == []


def test_unknown_key_names_line_and_known_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  learning_rate: 1e-4\n  lerning_rate: 2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}:3: sft.lerning_rate: unknown key 'lerning_rate'" in message
    assert "learning_rate" in message.split("known keys here:")[1]


@pytest.mark.parametrize(
    "text, line, field, words",
    [
        ("sft:\n  learning_rate: -1\n", 2, "sft.learning_rate", "greater than 0"),
        ("qat:\n  max_steps: 0\n", 2, "qat.max_steps", "train nothing"),
        ("ptq:\n  formats: [mxfp4, fp8]\n", 2, "ptq.formats.1", "mxfp4"),
        ("ptq:\n  calib_size: 0\n", 2, "ptq.calib_size", "greater than or equal to 1"),
        ("data:\n  eval_fraction: 1.5\n", 2, "data.eval_fraction", "less than 1"),
    ],
)
def test_out_of_range_values_are_named(text, line, field, words):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "bad.yaml")
    assert f"bad.yaml:{line}: {field}:" in str(err.value)
    assert words in str(err.value)


def test_duplicate_keys_are_rejected():
    with pytest.raises(RecipeError, match=r"r.yaml:3: sft.max_steps: duplicate key \(first at line 2\)"):
        parse_recipe("sft:\n  max_steps: 5\n  max_steps: 6\n", "r.yaml")


def test_invalid_yaml_names_the_line():
    with pytest.raises(RecipeError, match=r"r.yaml:2: not valid YAML"):
        parse_recipe("sft:\n\tmax_steps: 5\n", "r.yaml")


def test_yaml_round_trip_keeps_every_value():
    recipe = load_recipe(DEMO)
    again = parse_recipe(recipe_to_yaml(recipe), "roundtrip.yaml")
    assert again == recipe


def test_cli_flags_come_from_the_config():
    parser = argparse.ArgumentParser()
    add_recipe_flags(parser)
    args = parser.parse_args(["--sft.learning_rate", "3e-4", "--ptq.formats", "nvfp4", "--sft.lora", "true"])
    overrides = overrides_from_args(args)
    assert overrides == {"sft.learning_rate": 3e-4, "ptq.formats": ["nvfp4"], "sft.lora": True}
    recipe = parse_recipe(DEMO.read_text(), str(DEMO), overrides)
    assert recipe.sft.learning_rate == 3e-4 and recipe.ptq.formats == ["nvfp4"] and recipe.sft.lora
    with pytest.raises(SystemExit):
        parser.parse_args(["--ptq.formats", "int8"])


def test_defaults_follow_nvidia_recipe():
    recipe = Recipe()
    assert recipe.sft.learning_rate == 2e-5 and recipe.qat.learning_rate == 1e-5
    assert recipe.ptq.calib_size == 128 and recipe.sft.lr_scheduler_type == "cosine_with_min_lr"
