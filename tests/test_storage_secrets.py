"""The store refuses credentials in every table (README, Security): by key name (api_key, token, password, ...) and
by value (a bearer token, a vendor API key, a URL with a password), wherever the value sits; error texts are stored
with such values masked instead, since losing a job's failure would be worse. A real SQLite file each time."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage import Store, StorageError

LEAKS = {
    "key": {"api_key": "abc"},
    "bearer": {"headers": "Bearer sk-abc123"},
    "url": {"endpoint": "https://user:pass@host.example/v1"},
    "openai_key": {"note": "key sk-proj-AbCdEf0123456789xyz in a note"},
    "hf_token": {"note": ["hf_AbCdEfGhIjKlMnOpQrStUv"]},
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "studio.db")


def _every_write(store: Store, leak: dict, tmp_path: Path) -> dict:
    """One callable per table the store writes, each carrying `leak` where that table takes free-form data."""
    run = store.create_run("r", {"ok": 1})
    job = store.add_job(run, "sft", config={"lr": 1})
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    return {
        "runs": lambda: store.create_run("r", {"sft": leak}),
        "runs.update": lambda: store.update_run(run, recipe={"sft": leak}),
        "jobs": lambda: store.add_job(run, "sft", config={"x": leak}),
        "jobs.update": lambda: store.update_job(job, config=leak),
        "metrics": lambda: store.log_metrics(job, 1, {str(next(iter(leak.values()))): 1.0}),
        "evals": lambda: store.put_eval(run, job, "sft", "bf16", {"pass_rate": 1.0, "detail": leak}),
        "eval_examples": lambda: store.add_eval_examples([{"run_id": run, "job_id": job, "stage": "sft", "fmt": "bf16",
                                                           "task": "t", "idx": 0, "detail": leak}]),
        "artifacts": lambda: store.add_artifact(run, job, "export", str(artifact), meta=leak),
        "telemetry": lambda: store.add_telemetry({"gpu": leak}),
        "servers": lambda: store.add_server(backend="vllm", command=f"vllm serve m {next(iter(leak.values()))}"),
    }


@pytest.mark.parametrize("leak", list(LEAKS))
def test_every_table_refuses_a_credential(store, tmp_path, leak):
    writes = _every_write(store, LEAKS[leak], tmp_path)
    for table, write in writes.items():
        if leak == "key" and table in ("metrics", "servers"):
            continue  # a key name alone: these tables take no dicts (their strings are checked by value)
        with pytest.raises(StorageError, match="secret"):
            write()
    _assert_nothing_leaked(store.path, LEAKS[leak])


def _assert_nothing_leaked(db: Path, leak: dict) -> None:
    needle = str(next(iter(leak.values()))).strip("[]'")
    with sqlite3.connect(db) as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                assert not any(needle in str(cell) for cell in row), (table, row)


def test_key_names(store: Store) -> None:
    run = store.create_run("ok", {"model": {"pad_token": "<pad>", "max_new_tokens": 8, "api_key": ""},
                                  "tokenizer": {"eos_token": "x"}, "hub": {"token": None}})
    for recipe in ({"serve": {"api_key": "sk-1"}}, {"a": [{"HF_TOKEN": "hf_x"}]}, {"db": {"Password": "p"}},
                   {"openaiApiKey": "sk"}, {"headers": {"Authorization": "Bearer x"}}):
        with pytest.raises(StorageError, match="secret"):
            store.create_run("leaky", recipe)
    with pytest.raises(StorageError, match="secret"):
        store.add_job(run, "sft", config={"wandb": {"client_secret": "s"}})
    job = store.add_job(run, "sft", config={"lr": 1})
    with pytest.raises(StorageError, match="secret"):
        store.update_job(job, config={"access_token": "t"})
    with pytest.raises(StorageError, match="secret"):
        store.add_server(backend="vllm", command="vllm serve m --api-key sk-123")
    assert store.add_server(backend="vllm", command="vllm serve m --port 8000") > 0
    assert len(store.list_runs()) == 1 and store.get_job(job)["config"] == {"lr": 1}


def test_look_alikes_are_stored(store: Store, tmp_path: Path) -> None:
    """Text that merely resembles a credential: prose, a URL with a user but no password, tokenizer settings."""
    fine = {"prose": "Bearer bonds pay interest; a task-list; risk-free", "url": "https://user@host.example/x",
            "git": "git@github.com:org/repo.git", "eos_token": "<|return|>", "path": "runs/sk-1/exports"}
    run = store.create_run("ok", {"data": fine})
    job = store.add_job(run, "sft", config=fine)
    store.add_eval_examples([{"run_id": run, "job_id": job, "stage": "sft", "fmt": "bf16", "task": "t", "idx": 0,
                              "detail": fine}])
    assert store.get_run(run)["recipe"] == {"data": fine}
    assert store.eval_examples(run)[0]["detail"] == fine


def test_error_texts_are_masked_not_refused(store: Store) -> None:
    run = store.create_run("r", {})
    job = store.add_job(run, "sft")
    store.finish_job(job, "failed", error="HTTPError: 401 for https://me:hunter2@hub.example/x (Bearer sk-abc123)")
    error = store.get_job(job)["error"]
    assert store.get_job(job)["status"] == "failed"
    assert "hunter2" not in error and "sk-abc123" not in error and error.count("<redacted>") == 2
