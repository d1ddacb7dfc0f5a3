"""The QAT tab's "which modules get quantizers" table, without loading a model in the web process.

Exact when the run's PTQ stage has written runs/<id>/models/ptq-<fmt>/quant_summary.json; before that, a preview
computed once per (format, block size) by `python -m engine.fp4.preview` in the background and cached under
cache/quant_preview/. Layer indices are folded ('model.layers.*.mlp.experts') so the table reads the same for
2 layers or 36.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

from engine.runtime import workspace

_running: dict[str, subprocess.Popen] = {}
_lock = threading.Lock()
SCALE_NAMES = {"(8, 0)": "E8M0", "(4, 3)": "E4M3"}


def cache_file(workdir: Path, fmt: str, block_size: int | None) -> Path:
    return workspace.cache_dir(workdir) / "quant_preview" / f"{fmt}-{block_size or 'default'}.json"


def exact_file(run_dir: str | None, fmt: str) -> Path | None:
    if not run_dir:
        return None
    path = workspace.model_dir(Path(run_dir), "ptq", fmt) / "quant_summary.json"
    return path if path.exists() else None


def summary_for(workdir: Path, run_dir: str | None, fmt: str, block_size: int | None) -> tuple[list[dict] | None, str]:
    """(quantizer rows or None while computing, where they come from)."""
    exact = exact_file(run_dir, fmt)
    if exact:
        return json.loads(exact.read_text()), "exact: this run's PTQ output"
    cached = cache_file(workdir, fmt, block_size)
    if cached.exists():
        return json.loads(cached.read_text()), "preview: modelopt's config applied to gpt-oss's modules"
    error = _start_preview(workdir, fmt, block_size, cached)
    return None, error or "computing the preview (imports modelopt in a subprocess, ~20 s)…"


def _start_preview(workdir: Path, fmt: str, block_size: int | None, out: Path) -> str | None:
    """Start the subprocess unless it runs already; an error message if the last attempt failed."""
    key = str(out)
    with _lock:
        proc = _running.get(key)
        if proc is not None and proc.poll() is None:
            return None
        if proc is not None and proc.returncode != 0:
            del _running[key]  # let the next refresh retry, but say why this one failed
            return f"the preview failed (exit {proc.returncode}); see {out.with_suffix('.log')}"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "engine.fp4.preview", fmt, "--out", str(out)]
        if block_size:
            cmd += ["--block-size", str(block_size)]
        with open(out.with_suffix(".log"), "ab") as log:
            # Same process group as the app: stopping the app (Ctrl-C, killpg) stops a preview still computing.
            _running[key] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=workspace.REPO_ROOT)
    return None


def describe(detail: str) -> str:
    """modelopt's TensorQuantizer repr -> 'FP4 E2M1, blocks of 32, E8M0 scales'."""
    if "disabled" in detail:
        return "disabled"
    parts = []
    if "(2, 1) bit" in detail:
        parts.append("FP4 E2M1")
    block = re.search(r"-1: (\d+)", detail)
    if block:
        parts.append(f"blocks of {block[1]}")
    scale = re.search(r"'scale_bits': (\(\d+, \d+\))", detail)
    if scale:
        parts.append(f"{SCALE_NAMES.get(scale[1], scale[1])} scales")
    return ", ".join(parts) or detail[:80]


def folded_rows(rows: list[dict], fmt: str) -> list[dict]:
    """Enabled quantizers first, layers folded; disabled ones summarised in one line per module kind."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        module = re.sub(r"\.layers\.\d+\.", ".layers.*.", row["module"])
        key = (module, row["quantizer"], row["enabled"])
        group = groups.setdefault(key, {"format": fmt.upper(), "module": module, "quantizer": row["quantizer"],
                                        "enabled": "yes" if row["enabled"] else "no",
                                        "how": describe(row.get("detail", "")), "count": 0})
        group["count"] += 1
    return sorted(groups.values(), key=lambda g: (g["enabled"] != "yes", g["module"], g["quantizer"]))
