"""The rules the Store enforces, apart from SQL: statuses and how a run's follows from its jobs, the secret guard,
and small value checks. Kept here so storage/db.py stays about reading and writing rows."""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

RUN_STATUSES = {"queued", "running", "succeeded", "failed", "cancelled", "interrupted"}
RUN_TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}
JOB_STATUSES = RUN_STATUSES | {"skipped", "cancelling"}  # cancelling: asked to stop, the engine is killing it
JOB_TERMINAL = JOB_STATUSES - {"queued", "running", "cancelling"}
BLOCKING_DEP = {"failed", "cancelled", "skipped", "missing"}  # a queued job depending on one of these never runs
JSON_FIELDS = {"runs": ("recipe",), "jobs": ("config", "depends_on", "ranks", "timing"), "evals": ("metrics",),
               "eval_examples": ("detail",), "artifacts": ("meta",), "telemetry": ("sample",)}
REDACTED_FIELDS = {"error", "error_detail"}  # exception texts: masked, not refused (losing a failure is worse)
STATUS_FIELD = {"runs": RUN_STATUSES, "jobs": JOB_STATUSES}


class StorageError(Exception):
    """A request the store refuses: unknown row or column, bad status, secret in a recipe, too-new schema..."""


# Key names that hold credentials (matched after camelCase -> snake_case and '-' -> '_'). Deliberately not every
# "*_token": recipes legitimately carry tokenizer settings such as pad_token / eos_token / max_new_tokens.
SECRET_KEY = re.compile(
    r"(^|_)(api_?key|password|passwd|secret|secret_key|client_secret|private_key|authorization)$"
    r"|^token$|(^|_)(hf|hub|access|auth|api|bearer|refresh|github|gh|openai|wandb)_token$"
)
# The same inside a server's command line, e.g. "vllm serve ... --api-key sk-...".
SECRET_FLAG = re.compile(r"--(api[-_]?key|token|hf[-_]token|password|secret)[= ]+\S", re.IGNORECASE)
# Values that are credentials whatever key holds them, in any string of any row. Kept specific, since eval examples
# and datasets hold free text: a bearer token must contain a digit, '-' or '_' ("Bearer bonds" is prose), API keys
# need their vendor prefix and a key-like length, a URL needs both user and password before the '@'.
SECRET_VALUE = re.compile(
    r"\bBearer\s+(?=[\w.~+/-]*[0-9_-])[\w.~+/-]{3,}"
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"
    r"|\bhf_[A-Za-z0-9]{20,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/?#@:]+:[^\s/?#@]+@"
)


def _secret_key(key: str) -> bool:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace("-", "_")
    return bool(SECRET_KEY.search(snake))


def refuse_secrets(value: Any, where: str) -> None:
    """Raise StorageError if any dict key (recursively) names a credential with a non-empty value, or any string
    looks like one (SECRET_VALUE). Callers must strip secrets before storing: the DB is read by the UI and copied
    around with the workspace."""
    if isinstance(value, dict):
        for key, item in value.items():
            if _secret_key(str(key)) and item not in (None, "", [], {}):
                raise StorageError(f"{where}.{key} looks like a secret; strip it before storing (read it from the "
                                   "environment at run time instead)")
            refuse_secrets(str(key), f"{where}.{key}")
            refuse_secrets(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            refuse_secrets(item, f"{where}[{index}]")
    elif isinstance(value, str):
        if where.endswith(".command") and SECRET_FLAG.search(value):
            raise StorageError(f"{where} passes a secret on the command line; use an environment variable instead")
        if SECRET_VALUE.search(value):
            raise StorageError(f"{where} holds a value that looks like a secret (a bearer token, an API key or a "
                               "URL with a password); strip it before storing")


def redact_secrets(text: str | None) -> str | None:
    """An error text with credential-looking values masked: an exception may quote a URL or a header."""
    return None if text is None else SECRET_VALUE.sub("<redacted>", text)


def new_run_id() -> str:
    """'YYYYMMDD-HHMMSS-xxxx' in local time: sorts by creation, readable in a folder listing, 4 hex against clashes."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _resources(text: str | None) -> set[str]:
    return {part.strip() for part in (text or "").split(",") if part.strip()}


def _finite_or_none(name: str, value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"metric {name!r} is not a number: {value!r}") from exc
    return number if math.isfinite(number) else None


def _one_line(error: str | None, limit: int = 500) -> str | None:
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[0][:limit] if lines else None


def derive_run_status(job_statuses: Iterable[str], current: str) -> str:
    """A run's status from its jobs' (precedence matters; see refresh_run_status)."""
    seen = set(job_statuses)
    if not seen:
        return current
    if "running" in seen or "cancelling" in seen:
        return "running"
    if "failed" in seen:  # sticky: the run can no longer fully succeed, even if independent jobs are still queued
        return "failed"
    if "interrupted" in seen:  # nothing runs it, and the run cannot end without a resume (e.g. after a power cut)
        return "interrupted"
    if "queued" in seen:
        return "queued" if seen == {"queued"} else "running"
    if "cancelled" in seen:
        return "cancelled"
    return "succeeded" if seen == {"succeeded"} else "failed"  # a bare 'skipped' means a dependency went missing
