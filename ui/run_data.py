"""Read-only views of a run for the tabs: pipeline stages at a glance, durations, log tails, sizes. No Gradio here,
so each function is easy to test against a real Store."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from engine.recipe.configs import EMBEDDED_MODEL
from engine.runtime import workspace
from engine.runtime.pipeline import job_key

# The pipeline as drawn on the home tab: (card title, job stages it covers).
PIPELINE = [("Dataset", ("prepare",)), ("SFT", ("sft",)), ("PTQ", ("ptq",)), ("QAT", ("qat",)),
            ("Evaluate", ("evaluate",)), ("Export", ("export",)), ("Serve", ())]
# Most telling first: a group is 'failed' if any job failed, 'running' if any runs, ...
STATUS_PRECEDENCE = ("failed", "cancelling", "running", "interrupted", "cancelled", "queued", "skipped", "succeeded")
ACTIVE = {"queued", "running", "cancelling"}


def group_status(statuses: list[str]) -> str:
    if not statuses:
        return "none"
    seen = set(statuses)
    if seen <= {"succeeded", "skipped"}:
        return "succeeded" if seen == {"succeeded"} else "skipped"  # some never ran: the stage is incomplete
    if "succeeded" in seen and seen & {"queued"} and not seen & {"failed", "running", "cancelling"}:
        return "running"  # part done, the rest waiting: the stage is under way
    return next(s for s in STATUS_PRECEDENCE if s in seen)


def job_seconds(job: dict, now: float | None = None) -> float:
    if not job.get("started_at"):
        return 0.0
    end = job.get("ended_at") or (now or time.time())
    return max(0.0, end - job["started_at"])


def run_seconds(run: dict, now: float | None = None) -> float | None:
    if not run.get("started_at"):
        return None
    return max(0.0, (run.get("ended_at") or (now or time.time())) - run["started_at"])


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def pipeline_cards(store, run_id: str) -> list[dict]:
    """One dict per pipeline card: title, status, seconds, headline, progress (of a running job), jobs."""
    jobs = store.list_jobs(run_id)
    evals = store.evals(run_id)
    cards = []
    for title, stages in PIPELINE:
        group = [j for j in jobs if j["stage"] in stages]
        if title == "Serve":
            cards.append(_serve_card(store, run_id))
            continue
        running = [j for j in group if j["status"] in ("running", "cancelling")]
        cards.append({
            "title": title,
            "status": group_status([j["status"] for j in group]),
            "seconds": sum(job_seconds(j) for j in group) if group else None,
            "headline": headline(title, group, evals, store, run_id),
            "progress": running[0].get("progress") if running else None,
            "jobs": len(group),
        })
    return cards


def _serve_card(store, run_id: str) -> dict:
    servers = [s for s in store.list_servers() if s.get("run_id") == run_id]
    live = [s for s in servers if s["status"] in ("starting", "running", "ready")]
    text = ", ".join(f"{s.get('backend') or 'server'} on :{s.get('port')}" for s in live) or "not serving (Deploy tab)"
    return {"title": "Serve", "status": "running" if live else "none", "seconds": None, "headline": text,
            "progress": None, "jobs": len(servers)}


def headline(title: str, jobs: list[dict], evals: list[dict], store, run_id: str) -> str:
    """The one number worth seeing on a card."""
    if not jobs:
        return "not in this recipe"
    if title == "Dataset":
        found = re.search(r"train_rows (\d+), eval_rows (\d+)", " ".join(j.get("message") or "" for j in jobs))
        return f"{found[1]} train / {found[2]} eval rows" if found else _message(jobs)
    if title in ("PTQ", "QAT"):
        stage = title.lower()
        rates = [f"{e['fmt'].upper()} {100 * e['metrics']['pass_rate']:.0f}%" for e in evals
                 if e["stage"] == stage and isinstance(e["metrics"].get("pass_rate"), (int, float))]
        return " · ".join(rates) if rates else _message(jobs)
    if title == "SFT":
        rows = store.metrics(job_id=jobs[0]["id"], names=["loss", "eval_loss"])
        last = {r["name"]: r["value"] for r in rows if r["value"] is not None}
        if "eval_loss" in last:
            return f"eval loss {last['eval_loss']:.3f}"
        return f"loss {last['loss']:.3f}" if "loss" in last else _message(jobs)
    if title == "Evaluate":
        done = sum(j["status"] == "succeeded" for j in jobs)
        best = max((e["metrics"].get("pass_rate") or 0 for e in evals), default=None)
        return f"{done}/{len(jobs)} models" + (f" · best {100 * best:.0f}%" if best is not None else "")
    if title == "Export":
        sizes = [f"{(a['meta'] or {}).get('format', '?').upper()} {fmt_bytes(a.get('bytes'))}"
                 for a in store.artifacts(run_id, kind="export")]
        return " · ".join(sizes) if sizes else _message(jobs)
    return _message(jobs)


def _message(jobs: list[dict]) -> str:
    for job in jobs:
        if job["status"] in ("running", "cancelling") and job.get("message"):
            return job["message"][:80]
    return {"queued": "waiting", "skipped": "skipped"}.get(group_status([j["status"] for j in jobs]), "")


SHORT_TRAINING_STEPS = 50  # fewer SFT steps than this teach the tiny model nothing measurable (smoke: 8)


def short_training_note(run: dict | None) -> str:
    """Why a run's table is all zeros when it trained only a handful of steps (the smoke recipe); '' otherwise."""
    recipe = (run or {}).get("recipe") or {}
    sft, qat, model = recipe.get("sft") or {}, recipe.get("qat") or {}, recipe.get("model") or {}
    steps = sft.get("max_steps")
    if not sft.get("enabled", True) or not isinstance(steps, int) or not 0 < steps < SHORT_TRAINING_STEPS:
        return ""
    trained = f"{steps} SFT steps"
    if qat.get("enabled", True) and (recipe.get("ptq") or {}).get("formats") and isinstance(qat.get("max_steps"), int) \
            and qat["max_steps"] > 0:
        trained += f" and {qat['max_steps']} QAT steps"
    if model.get("source") == EMBEDDED_MODEL and model.get("tiny_pretrain_steps"):
        trained += f", from a tiny base pre-trained for {model['tiny_pretrain_steps']} steps"
    return (f"Recipe '{recipe.get('name', '?')}' trained only {trained}: enough to check that every stage runs, far "
            "too few to learn the tasks, so pass rates near 0% are expected. The demo recipe (300 SFT steps) is "
            "the one whose results mean something.")


def problem_jobs(store, run_id: str) -> list[dict]:
    """Jobs that need the user's attention (failed / interrupted / cancelled), with their log tail."""
    out = []
    for job in store.list_jobs(run_id):
        if job["status"] in ("failed", "interrupted", "cancelled"):
            out.append({**job, "key": job_key(job), "log_tail": log_tail(job.get("log_path"), 40)})
    return out


def split_advice(error: str | None) -> tuple[str, str]:
    """engine.runtime.failure_hints appends ' -- <advice>' to an error line; (error, advice)."""
    text = error or "(no error message recorded)"
    head, sep, tip = text.partition(" -- ")
    return head, tip if sep else ""


def log_tail(path: str | None, lines: int = 40) -> str:
    """The last `lines` lines of a job's log, read from disk (the log can be large: read only its end)."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 48_000))
        data = f.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def best_pass_rate(store, run_id: str) -> float | None:
    rates = [e["metrics"].get("pass_rate") for e in store.evals(run_id)]
    rates = [r for r in rates if isinstance(r, (int, float))]
    return max(rates) if rates else None


def dir_bytes(path: str | Path | None) -> int | None:
    if not path or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_dir_for(run: dict, stage: str, fmt: str = "bf16") -> Path | None:
    """A stage's saved model; for 'original' the base model the prepare stage resolved (models/base.json)."""
    if not run.get("run_dir"):
        return None
    root = Path(run["run_dir"])
    if stage == "original":
        pointer = root / "models" / "base.json"
        return Path(json.loads(pointer.read_text())["path"]) if pointer.exists() else None
    return workspace.model_dir(root, stage, fmt)


def expert_param_count(model_dir: Path | None) -> int | None:
    """Number of MoE expert weights in a saved model, from the safetensors headers only (no torch, no tensor data)."""
    if not model_dir or not Path(model_dir).exists():
        return None
    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name != "__metadata__" and re.search(r"mlp\.experts\.(gate_up_proj|down_proj)$", name):
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total or None
