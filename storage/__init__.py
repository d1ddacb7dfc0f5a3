"""Workspace database: runs, jobs, metrics, evals, artifacts, telemetry, engines, servers. The only code that
speaks SQL; everything else goes through Store."""

from .db import Store, StorageError
from .hashing import sha256_path
from .migrations import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Store", "StorageError", "sha256_path"]
