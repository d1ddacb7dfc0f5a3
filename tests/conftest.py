"""Test-wide settings: offline Hugging Face libraries (nothing can be downloaded here; without this they retry
for ~45 s), two CPU threads like CI, and a per-test workspace."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh workspace; QAT_STUDIO_HOME points at it so child processes agree."""
    path = tmp_path / "workspace"
    path.mkdir()
    monkeypatch.setenv("QAT_STUDIO_HOME", str(path))
    return path
