"""Bad input is refused before anything exists: a message naming file, line and field, exit status 2, no traceback,
no database, no workspace (issue 5's corpus: data files and recipes, each with the message it must produce)."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch
from tests.helpers import launch as launch_process

FIXTURES = Path(__file__).parent / "fixtures"
DATA, RECIPES = FIXTURES / "bad_data", FIXTURES / "bad_recipes"

DATA_CASES = [
    ("empty.jsonl", "empty.jsonl: file: empty file"),
    ("not_utf8.jsonl", "not_utf8.jsonl:2: file: not UTF-8"),
    ("malformed.jsonl", "malformed.jsonl:2: json: malformed JSON"),
    ("not_object.jsonl", "not_object.jsonl:2: row: is a list, not an object"),
    ("no_messages.jsonl", "no_messages.jsonl:1: messages: missing"),
    ("messages_not_list.jsonl", "messages_not_list.jsonl:1: messages: is a str, not a list"),
    ("unknown_role.jsonl", "unknown_role.jsonl:2: messages[0].role: unknown role 'robot'"),
    ("content_not_string.jsonl", "content_not_string.jsonl:1: messages[0].content: is a int, not a string"),
    ("missing_content.jsonl", "missing_content.jsonl:1: messages[1].content: missing"),
    ("no_assistant.jsonl", "no_assistant.jsonl:1: messages: no assistant turn"),
    ("thinking_not_string.jsonl", "thinking_not_string.jsonl:1: messages[1].thinking: is a list, not a string"),
    ("duplicate_keys.jsonl", "duplicate_keys.jsonl:1: json: duplicate key 'content'"),
    ("blank_lines.jsonl", "blank_lines.jsonl:3: messages: no assistant turn"),
    ("unsupported.csv", "unsupported.csv: source: unsupported extension '.csv'"),
    ("too_long.jsonl", "too_long.jsonl:2: messages:"),
]
RECIPE_CASES = [
    ("unknown_key.yaml", "unknown_key.yaml:4: sft.max_step: unknown key 'max_step'"),
    ("negative_lr.yaml", "negative_lr.yaml:2: sft.learning_rate: Input should be greater than 0"),
    ("zero_steps.yaml", "zero_steps.yaml:2: qat.max_steps:"),
    ("block_size.yaml", "ptq.block_size: 24 does not divide the model's hidden_size (128)"),
    ("duplicate_section.yaml", "duplicate_section.yaml:3: sft: duplicate key (first at line 1)"),
    ("tab_indent.yaml", "tab_indent.yaml:2: not valid YAML"),
    ("wrong_type.yaml", "wrong_type.yaml:2: eval.max_new_tokens: Input should be a valid integer"),
    ("unknown_format.yaml", "unknown_format.yaml:2: ptq.formats.1:"),
    ("not_a_mapping.yaml", "not_a_mapping.yaml:1: the recipe must be a mapping"),
    ("missing_dataset.yaml", "does_not_exist.jsonl: source: file not found"),
]


def _run(argv: list[str], workdir: Path, capsys) -> tuple[int, str]:
    code = launch.main(["--workdir", str(workdir), *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name, expected", DATA_CASES)
def test_bad_dataset_is_refused(tmp_path, capsys, name, expected):
    workdir = tmp_path / "ws"
    code, err = _run(["run", "assets/recipes/smoke.yaml", "--data.source", str(DATA / name)], workdir, capsys)
    assert code == 2 and expected in err, err
    assert not workdir.exists()


@pytest.mark.parametrize("name, expected", RECIPE_CASES)
def test_bad_recipe_is_refused(tmp_path, capsys, name, expected):
    workdir = tmp_path / "ws"
    code, err = _run(["run", str(RECIPES / name)], workdir, capsys)
    assert code == 2 and expected in err, err
    assert not workdir.exists()


def test_dataset_path_that_is_a_directory_or_missing(tmp_path, capsys):
    workdir = tmp_path / "ws"
    code, err = _run(["run", "assets/recipes/smoke.yaml", "--data.source", str(tmp_path)], workdir, capsys)
    assert code == 2 and "is a directory" in err
    code, err = _run(["run", "assets/recipes/smoke.yaml", "--model.source", str(tmp_path / "no-model")], workdir,
                     capsys)
    assert code == 2 and "model.source" in err and "config.json" in err
    assert not workdir.exists()


def test_the_cli_process_exits_2_without_a_traceback(tmp_path):
    proc = launch_process(["--workdir", str(tmp_path / "ws"), "run", str(RECIPES / "negative_lr.yaml")], timeout=120)
    assert proc.returncode == 2 and "sft.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_corpus_is_at_least_twenty_files():
    assert len(DATA_CASES) + len(RECIPE_CASES) >= 20
    assert {n for n, _ in DATA_CASES} | {n for n, _ in RECIPE_CASES} == {p.name for p in DATA.iterdir()} | {
        p.name for p in RECIPES.iterdir()}
