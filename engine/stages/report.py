"""Last stage: the results table (original / SFT / SFT+PTQ / SFT+QAT per format) as summary.json."""

from __future__ import annotations

import json
import os

from engine.runtime.context import Context
from engine.evaluation.results import summary


def run(ctx: Context) -> dict:
    data = summary(ctx.store, ctx.run_id)
    path = ctx.run_dir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    ctx.store.add_artifact(ctx.run_id, ctx.job_id, "summary", str(path))
    return {"rows": len(data["rows"]), "summary": str(path)}
