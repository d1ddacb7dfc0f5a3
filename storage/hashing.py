"""Content hashes for artifacts (checkpoints, exported models, reports).

Files are streamed in 1 MiB chunks so multi-GB safetensors shards never sit in memory. A directory hash is a sha256
over its sorted (relative path, file sha256) pairs, so it changes when any byte, any file name or the set of files
changes, and does not depend on the order the filesystem lists entries in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _files_under(root: Path) -> list[Path]:
    # Symlinked files are hashed by content (Hugging Face snapshots are symlinks into a blob store); symlinked
    # directories are not descended into, so a link loop cannot hang us. Empty directories add nothing.
    found = []
    for folder, _dirs, names in os.walk(root):
        found.extend(Path(folder) / name for name in names)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def sha256_path(path: str | os.PathLike) -> tuple[str, int]:
    """Return (sha256 hex, total bytes) of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash {path}: no such file or directory")
    digest = hashlib.sha256()
    total = 0
    for file in _files_under(path):
        file_hash, size = _sha256_file(file)
        # NUL and newline cannot be ambiguous here: NUL never appears in a path, and the hash is fixed-length hex.
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_hash}\n".encode())
        total += size
    return digest.hexdigest(), total


def size_of_path(path: str | os.PathLike) -> int | None:
    """Total bytes of a file or directory without hashing it; None if it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(file.stat().st_size for file in _files_under(path))
    return None
