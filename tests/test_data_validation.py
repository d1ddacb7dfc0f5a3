"""Loading and validating training data: every bad input names file, line, field and what to do."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from engine.data import chat_data, embedded_model  # noqa: E402
from engine.data.chat_data import DataError, load_chat_dataset  # noqa: E402

BAD = Path(__file__).parent / "fixtures" / "bad_data"
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("name, expected", [
    ("empty.jsonl", "empty.jsonl: file: empty file — add one JSON object"),
    ("not_utf8.jsonl", "not_utf8.jsonl:2: file: not UTF-8"),
    ("malformed.jsonl", "malformed.jsonl:2: json: malformed JSON"),
    ("not_object.jsonl", "not_object.jsonl:2: row: is a list, not an object"),
    ("no_messages.jsonl", "no_messages.jsonl:1: messages: missing"),
    ("messages_not_list.jsonl", "messages_not_list.jsonl:1: messages: is a str, not a list"),
    ("unknown_role.jsonl", "unknown_role.jsonl:2: messages[0].role: unknown role 'robot' — use one of system, "),
    ("content_not_string.jsonl", "content_not_string.jsonl:1: messages[0].content: is a int, not a string"),
    ("missing_content.jsonl", "missing_content.jsonl:1: messages[1].content: missing"),
    ("no_assistant.jsonl", "no_assistant.jsonl:1: messages: no assistant turn"),
    ("thinking_not_string.jsonl", "thinking_not_string.jsonl:1: messages[1].thinking: is a list, not a string"),
    ("duplicate_keys.jsonl", "duplicate_keys.jsonl:1: json: duplicate key 'content'"),
    ("blank_lines.jsonl", "blank_lines.jsonl:3: messages: no assistant turn"),  # line numbers count blank lines
    ("unsupported.csv", "unsupported.csv: source: unsupported extension '.csv' — convert it to .jsonl"),
])
def test_each_bad_fixture_is_named_precisely(name, expected):
    with pytest.raises(DataError) as error:
        load_chat_dataset(str(BAD / name))
    message = str(error.value)
    assert expected in message, message
    assert str(BAD / name) in message and " — " in message
    assert error.value.issues  # kept for the UI


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_chat_dataset(str(tmp_path))
    with pytest.raises(DataError, match=r"nope\.jsonl: source: file not found"):
        load_chat_dataset("nope.jsonl", root=tmp_path)
    with pytest.raises(DataError, match="unknown embedded dataset"):
        load_chat_dataset("embedded:nonsense")


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(DataError) as error:
        load_chat_dataset("some-org/some-dataset-that-is-not-cached")
    message = str(error.value)
    assert message.startswith("some-org/some-dataset-that-is-not-cached: source: could not load Hugging Face")
    assert "network" in message


def test_issues_are_capped_with_a_count(tmp_path):
    bad = tmp_path / "many.jsonl"
    bad.write_text("\n".join(['{"messages": []}'] * 30) + "\n")
    with pytest.raises(DataError) as error:
        load_chat_dataset(str(bad))
    lines = str(error.value).splitlines()
    assert len(lines) == chat_data.MAX_ISSUES + 1 and lines[-1] == "... and 10 more"
    assert lines[0].startswith(f"{bad}:1: messages: no assistant turn")


def test_json_errors_and_schema_errors_are_reported_together(tmp_path):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"messages": 3}\n{oops\n' + json.dumps(GOOD_ROW) + "\n")
    with pytest.raises(DataError) as error:
        load_chat_dataset(str(bad))
    assert [(i.line, i.field) for i in error.value.issues] == [(1, "messages"), (2, "json")]


def test_jsonl_and_parquet_load_the_same_rows(tmp_path):
    rows = [dict(GOOD_ROW, task="t", reference="Hello")] * 3
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    from_jsonl = load_chat_dataset("rows.jsonl", root=tmp_path)
    from_parquet = load_chat_dataset(str(tmp_path / "rows.parquet"))
    assert from_jsonl == rows
    assert [r["messages"][1]["content"] for r in from_parquet] == ["Hello"] * 3
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: file: not a valid parquet file"):
        load_chat_dataset(str(tmp_path / "broken.parquet"))


def test_embedded_sources():
    demo = load_chat_dataset("embedded:demo")
    assert len(demo) == 12_000 and {r["task"] for r in demo} == {"language", "refusal"}
    assert {r["task"] for r in load_chat_dataset("embedded:refusal")} == {"refusal"}


def test_split_is_deterministic_stratified_and_disjoint():
    rows = load_chat_dataset("embedded:demo")
    train, evaluation = chat_data.split_train_eval(rows, 0.1, seed=42)
    assert (train, evaluation) == chat_data.split_train_eval(rows, 0.1, seed=42)
    assert evaluation != chat_data.split_train_eval(rows, 0.1, seed=7)[1]
    assert sum(r["task"] == "language" for r in evaluation) == 600
    assert sum(r["task"] == "refusal" for r in evaluation) == 600
    assert len(train) + len(evaluation) == len(rows)
    assert not {id(r) for r in train} & {id(r) for r in evaluation}


def test_tiny_groups_keep_a_row_on_each_side():
    rows = [dict(GOOD_ROW, task="a"), dict(GOOD_ROW, task="a"), dict(GOOD_ROW)]
    train, evaluation = chat_data.split_train_eval(rows, 0.01, seed=0)
    assert len(train) == 2 and len(evaluation) == 1 and evaluation[0]["task"] == "a"


def test_check_lengths_and_stats():
    tokenizer = embedded_model.load_tokenizer()
    long_row = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    issues = chat_data.check_lengths([GOOD_ROW, long_row], tokenizer, max_length=64, source="f.jsonl")
    assert len(issues) == 1 and str(issues[0]).startswith("f.jsonl:2: messages: ")
    assert "longer than max_length 64" in str(issues[0])
    stats = chat_data.dataset_stats([GOOD_ROW, long_row], tokenizer)
    assert stats["rows"] == 2 and stats["roles"] == {"user": 2, "assistant": 2}
    assert stats["token_lengths"][1] > 64 > stats["token_lengths"][0]


def test_token_lengths_are_remembered_per_content_and_tokenizer():
    """The app checks lengths before every run; a repeated check is served from memory, an edited one is not."""
    tokenizer = embedded_model.load_tokenizer()
    rows = [GOOD_ROW, {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "ok"}]}]
    first = chat_data.token_lengths(rows, tokenizer)
    rendered = []
    original = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *a, **k: rendered.append(1) or original(*a, **k)
    assert chat_data.token_lengths(rows, tokenizer) == first and not rendered  # same rows: not rendered again
    edited = [GOOD_ROW, {"messages": [{"role": "user", "content": "a b " * 20}, {"role": "assistant", "content": "ok"}]}]
    assert chat_data.token_lengths(edited, tokenizer)[1] > first[1] and rendered == [1]
    other = embedded_model.load_tokenizer()  # another tokenizer object (it could be another model's): counted afresh
    other_rendered = []
    other_original = other.apply_chat_template
    other.apply_chat_template = lambda *a, **k: other_rendered.append(1) or other_original(*a, **k)
    assert chat_data.token_lengths(rows, other) == first and other_rendered == [1]


def test_run_validation_counts_tokens_like_the_run_without_importing_torch(tmp_path):
    """`launch.py run` checks lengths before a run exists; it must count exactly the tokens the stages will (their
    tokenizer comes from AutoTokenizer) and must not pay for importing torch to do it."""
    import subprocess
    import sys

    from engine.recipe.configs import Recipe
    from engine.runs import _tokenizer_for

    rows = load_chat_dataset("embedded:demo")[:300]
    light = _tokenizer_for(Recipe(), None)
    assert chat_data.token_lengths(rows, light) == chat_data.token_lengths(rows, embedded_model.embedded_tokenizer())
    assert light.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True) == \
        embedded_model.embedded_tokenizer().apply_chat_template(rows[0]["messages"][:1], tokenize=False,
                                                                add_generation_prompt=True)
    probe = ("import sys; from engine.runs import load_and_validate; "
             "load_and_validate('assets/recipes/demo.yaml', {}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
