"""Test-wide settings: offline Hugging Face libraries (nothing can be downloaded here; without this they retry
for ~45 s), two CPU threads like CI, and a per-test workspace."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # see engine/__init__.py: spinning OpenMP threads stall shared CPUs

import pytest  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh workspace; QAT_STUDIO_HOME points at it so child processes agree."""
    path = tmp_path / "workspace"
    path.mkdir()
    monkeypatch.setenv("QAT_STUDIO_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session: the embedded base model is pre-trained once (deterministic, so safe)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, shared_cache):
    """The smoke recipe run end to end, with its SFT job killed mid-way and resumed (slow: shared by tests)."""
    from tests.helpers import run_killed_and_resumed, stop_engines

    old = os.environ.get("QAT_STUDIO_CACHE")
    os.environ["QAT_STUDIO_CACHE"] = str(shared_cache)
    try:
        store, run_id, info = run_killed_and_resumed(tmp_path_factory.mktemp("resumed") / "ws")
        yield store, run_id, info
        stop_engines(store)
    finally:
        if old is None:
            os.environ.pop("QAT_STUDIO_CACHE", None)
        else:
            os.environ["QAT_STUDIO_CACHE"] = old
