"""Load and validate chat training data before anything runs.

Sources: 'embedded:demo' (both demo tasks), 'embedded:language', 'embedded:refusal', a .jsonl or .parquet file,
or a Hugging Face dataset id (needs a network). Rows use the `messages` chat layout (roles system / developer /
user / assistant; an assistant turn may carry `thinking`), optionally with `task` and `reference`.

Every problem is reported as `file:line: field: problem — what to do`, all of them at once (up to MAX_ISSUES),
so a user fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.data.demo_tasks import DATASETS_DIR, SFT_TASKS
from engine.data.harmony import ROLES

MAX_ISSUES = 20
EMBEDDED = {"embedded:demo": SFT_TASKS, **{f"embedded:{task}": (task,) for task in SFT_TASKS}}
FILE_TYPES = (".jsonl", ".parquet")
# Extensions that mark a source as a file (so 'data.csv' is an unsupported file, not a hub id).
OTHER_FILE_TYPES = (".json", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx")


@dataclass(frozen=True)
class DataIssue:
    source: str
    line: int | None  # 1-based line (jsonl) or row number (parquet / hub); None for the whole source
    field: str
    problem: str
    fix: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.problem} — {self.fix}"


class DataError(Exception):
    """Raised with every issue found; `issues` keeps them for the UI."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = issues
        shown = [str(issue) for issue in issues[:MAX_ISSUES]]
        if len(issues) > MAX_ISSUES:
            shown.append(f"... and {len(issues) - MAX_ISSUES} more")
        super().__init__("\n".join(shown))


def _fail(source: str, field: str, problem: str, fix: str, line: int | None = None) -> DataError:
    return DataError([DataIssue(source, line, field, problem, fix)])


# ---------------------------------------------------------------- loading


def load_chat_dataset(source: str, root: Path | None = None) -> list[dict]:
    """Rows of `source`, validated (raises DataError listing every problem). Relative paths resolve against
    `root` (default: the current directory); embedded sources always come from the repository's assets."""
    source = source.strip()
    if source in EMBEDDED:
        return [row for task in EMBEDDED[source] for row in _load_file(DATASETS_DIR / f"{task}.jsonl")]
    if source.startswith("embedded:"):
        raise _fail(source, "source", "unknown embedded dataset", f"use one of {', '.join(EMBEDDED)}")
    path = Path(source).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if _looks_like_hub_id(source) and not path.exists():
        rows = _load_hub(source)
        _raise_if(validate_rows(rows, source))
        return rows
    return _load_file(path)


def _looks_like_hub_id(source: str) -> bool:
    """'owner/name' or 'name' without a file extension or a path prefix."""
    if source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in (*FILE_TYPES, *OTHER_FILE_TYPES):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None


def _raise_if(issues: list[DataIssue]) -> None:
    if issues:
        raise DataError(issues)


def _load_file(path: Path) -> list[dict]:
    name = str(path)
    if path.is_dir():
        raise _fail(name, "source", "is a directory", "point to a .jsonl or .parquet file inside it")
    if not path.exists():
        raise _fail(name, "source", "file not found", "check the path (shown here as it was resolved)")
    if path.suffix.lower() not in FILE_TYPES:
        raise _fail(name, "source", f"unsupported extension '{path.suffix}'",
                    "convert it to .jsonl (one JSON object a line) or .parquet")
    try:
        if path.suffix.lower() == ".parquet":
            rows, lines = _read_parquet(path), None
        else:
            rows, lines = _read_jsonl(path)
    except PermissionError:
        raise _fail(name, "source", "file is not readable", "fix its permissions") from None
    except OSError as error:
        raise _fail(name, "source", f"cannot be read ({error})", "check that it is a valid file") from None
    _raise_if(validate_rows(rows, name, lines))
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowException as error:
        raise _fail(str(path), "file", f"not a valid parquet file ({error})", "re-export it as parquet") from None


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key{'s' if len(duplicates) > 1 else ''} {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def _read_jsonl(path: Path) -> tuple[list, list[int]]:
    """Rows of a jsonl file and their line numbers (blank lines are skipped); JSON errors of every line at once."""
    name = str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise _fail(name, "file", f"not UTF-8 (byte {error.start})", "re-save the file as UTF-8", line) from None
    if not text.strip():
        raise _fail(name, "file", "empty file", "add one JSON object per line with a `messages` list")
    rows, lines, issues = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, object_pairs_hook=_reject_duplicate_keys))
            lines.append(number)
        except json.JSONDecodeError as error:
            issues.append(DataIssue(name, number, "json", f"malformed JSON ({error.msg} at column {error.colno})",
                                    "fix the line so it is one complete JSON object"))
        except ValueError as error:
            issues.append(DataIssue(name, number, "json", str(error), "keep each key once per object"))
    if issues:  # report the schema problems of the lines that did parse too, in line order
        issues += validate_rows(rows, name, lines) if rows else []
        raise DataError(sorted(issues, key=lambda issue: issue.line or 0))
    return rows, lines


def _load_hub(source: str) -> list[dict]:
    try:
        import datasets

        return datasets.load_dataset(source, split="train").to_list()
    except Exception as error:  # offline, unknown id, gated repo...: all end the same way for the user
        raise _fail(source, "source", f"could not load Hugging Face dataset ({type(error).__name__}: {error})",
                    "hub datasets need a network connection; offline, download it elsewhere and pass a .jsonl "
                    "or .parquet file") from None


# ---------------------------------------------------------------- validation


def validate_rows(rows: list, source: str, lines: list[int] | None = None) -> list[DataIssue]:
    """Every schema problem of `rows`. `lines` gives each row's line in the file; default: 1-based row numbers."""
    if not rows:
        return [DataIssue(source, None, "file", "no rows", "add at least one conversation")]
    lines = lines or list(range(1, len(rows) + 1))
    issues: list[DataIssue] = []
    for number, row in zip(lines, rows):
        issues += _row_issues(row, source, number)
    return issues


def _row_issues(row: object, source: str, line: int) -> list[DataIssue]:
    def issue(field: str, problem: str, fix: str) -> DataIssue:
        return DataIssue(source, line, field, problem, fix)

    if not isinstance(row, dict):
        return [issue("row", f"is a {type(row).__name__}, not an object", 'write {"messages": [...]} per line')]
    if "messages" not in row:
        return [issue("messages", "missing", 'add "messages": a list of {"role", "content"} objects')]
    messages = row["messages"]
    if not isinstance(messages, list):
        return [issue("messages", f"is a {type(messages).__name__}, not a list", "make it a list of messages")]
    issues = []
    for i, message in enumerate(messages):
        issues += _message_issues(message, f"messages[{i}]", issue)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        issues.append(issue("messages", "no assistant turn", "add the answer the model should learn as "
                            '{"role": "assistant", "content": ...}'))
    return issues


def _message_issues(message: object, field: str, issue) -> list[DataIssue]:
    if not isinstance(message, dict):
        return [issue(field, f"is a {type(message).__name__}, not an object", 'use {"role": ..., "content": ...}')]
    issues = []
    role = message.get("role")
    if role not in ROLES:
        issues.append(issue(f"{field}.role", f"unknown role {role!r}", f"use one of {', '.join(ROLES)}"))
    if "content" not in message or message["content"] is None:
        issues.append(issue(f"{field}.content", "missing", "add the message text as a string"))
    elif not isinstance(message["content"], str):
        issues.append(issue(f"{field}.content", f"is a {type(message['content']).__name__}, not a string",
                            "write the message text as one string"))
    thinking = message.get("thinking")
    if thinking is not None and not isinstance(thinking, str):  # null is fine: parquet/hub rows fill it in
        issues.append(issue(f"{field}.thinking", f"is a {type(thinking).__name__}, not a string",
                            "write the reasoning as one string, or leave it out"))
    return issues


def check_lengths(rows: list[dict], tokenizer, max_length: int, source: str = "data") -> list[DataIssue]:
    """Rows whose tokenized chat is longer than `max_length` (line = 1-based row number)."""
    lengths = token_lengths(rows, tokenizer)
    return [
        DataIssue(source, number, "messages", f"{length} tokens, longer than max_length {max_length}",
                  "shorten the conversation or raise data.max_length")
        for number, length in enumerate(lengths, start=1) if length > max_length
    ]


def token_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Each row's chat length in tokens. Rendering the chat template is the slow part (~2.5 s for the 12,000 demo
    rows), and the app checks the same dataset before every run: results are kept per (tokenizer object, content).
    An entry holds its tokenizer, so that object's id cannot be reused while the entry exists."""
    conversations = [row["messages"] for row in rows]
    key = (id(tokenizer), rows_digest(conversations))
    if key not in _LENGTHS:
        encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
        if len(_LENGTHS) >= 8:
            _LENGTHS.pop(next(iter(_LENGTHS)))  # oldest first
        _LENGTHS[key] = (tokenizer, [len(ids) for ids in encoded["input_ids"]])
    return list(_LENGTHS[key][1])


_LENGTHS: dict[tuple[int, str], tuple[object, list[int]]] = {}


# ---------------------------------------------------------------- split and stats


def split_train_eval(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split, stratified by `task` (rows without one form their own group); both halves keep the
    input order. Each group of two or more rows gives at least one eval row and keeps at least one for training."""
    groups: dict[object, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.get("task"), []).append(index)
    held_out: set[int] = set()
    for task, indices in sorted(groups.items(), key=lambda kv: str(kv[0])):
        shuffled = list(indices)
        random.Random(f"{seed}-{task}").shuffle(shuffled)
        count = round(len(indices) * eval_fraction)
        if len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        held_out.update(shuffled[:count])
    train = [row for i, row in enumerate(rows) if i not in held_out]
    evaluation = [row for i, row in enumerate(rows) if i in held_out]
    return train, evaluation


def dataset_stats(rows: list[dict], tokenizer=None) -> dict:
    roles = Counter(m.get("role") for row in rows for m in row.get("messages", []))
    stats = {
        "rows": len(rows),
        "roles": dict(roles),
        "tasks": dict(Counter(row.get("task") or "(none)" for row in rows)),
        "with_thinking": sum(any(m.get("thinking") for m in row.get("messages", [])) for row in rows),
    }
    if tokenizer is not None:
        stats["token_lengths"] = token_lengths(rows, tokenizer)
    return stats


def tokenizer_digest(tokenizer) -> str | None:
    """A hash of a fast tokenizer's vocabulary, merges, special tokens and chat template (None without a fast
    backend): equal for the same tokenizer loaded again from another stage's output directory."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    text = backend.to_str() + "\0" + str(getattr(tokenizer, "chat_template", None))
    return hashlib.sha256(text.encode()).hexdigest()


def rows_digest(rows: list[dict]) -> str:
    """A hash of the rows' content (what a cache of their tokenization is keyed on)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
