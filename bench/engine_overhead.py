"""What the engine costs on top of the work: a recipe through the engine vs one plain process doing the same stages.

    python bench/engine_overhead.py --recipe assets/recipes/demo.yaml [--set sft.max_steps=50 ...] --json out.json

Both sides run the same stage functions (engine/stages/*) with the same libraries on the same machine, one after
the other, in fresh workspaces that share one cache directory (so the embedded base model is pre-trained once, in
a first, untimed pass: the base the recipe's prepare stage asks for, MXFP4-released by default; that pass's time is
printed as `prepare (cold)`):
  engine  `python launch.py run RECIPE` in a fresh workspace: the engine process, a job process per chain, storage
          polling, logs; wall time from the command's start to its exit, and each job's wall time from the jobs table.
  bare    one Python process that imports what the stages need and calls each job's stage function in dependency
          order (the order the engine would take), sharing one loaded model between consecutive jobs the way the
          engine's chained job processes do; no engine, no child processes. Its wall time includes its imports.
The ratio engine / bare is the engine's overhead. Per-job overhead = a job's wall time in the engine minus the
same job's wall time in the bare process.

Result: a table on stdout (total and per-job seconds, both sides, and the ratio); --json FILE writes the same
numbers (kept in docs/results/, summarised with the machine and the date in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BARE = """
import json, sys, time
t0 = time.time()
from pathlib import Path
from engine.recipe.configs import Recipe
from engine.recipe.files import load_recipe
from engine.runtime import workspace
from engine.runtime.context import Context, pick_device
from engine.runtime.pipeline import enqueue
from engine.stages import stage_function
from storage import Store
import engine.stages.sft, engine.stages.ptq, engine.stages.qat, engine.stages.evaluate, engine.stages.export  # noqa

workdir = Path(sys.argv[1]); workdir.mkdir(parents=True, exist_ok=True)
overrides = json.loads(sys.argv[3])
recipe = load_recipe(sys.argv[2], overrides)
store = Store(workspace.db_path(workdir))
run_id = enqueue(store, recipe, workdir)
imports = time.time() - t0
models, times = {}, {}
while True:
    job = store.claim_job(pid=None)
    if job is None:
        break
    start = time.time()
    run = store.get_run(run_id)
    ctx = Context(store, workdir, run, job, recipe, pick_device(recipe, job["resources"]), models=models)
    stage_function(job["stage"])(ctx)
    store.finish_job(job["id"], "succeeded")
    times[job["config"]["key"]] = time.time() - start
print(json.dumps({"imports_s": imports, "jobs": times, "total_s": time.time() - t0}))
"""


def engine_side(recipe: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    flags = [part for item in overrides for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    start = time.time()
    out = subprocess.run([sys.executable, "launch.py", "--workdir", str(workdir), "run", recipe, *flags], cwd=REPO,
                         capture_output=True, text=True, env=env)
    total = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"engine run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    from storage import Store

    store = Store(workdir / "studio.db")
    run_id = store.list_runs()[0]["id"]
    jobs = {j["config"]["key"]: j["ended_at"] - j["started_at"] for j in store.list_jobs(run_id)}
    pids = {j["pid"] for j in store.list_jobs(run_id)}
    # Each job's own breakdown (engine/runtime/job_timing.py: start + imports, load, compute, save), so a result
    # says where an engine-side excess went, not only that there is one.
    timing = {j["config"]["key"]: j.get("timing") for j in store.list_jobs(run_id)}
    return {"total_s": total, "jobs": jobs, "processes": len(pids), "timing": timing}


def bare_side(recipe: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    from bench.lib.overrides import parse_overrides

    values = parse_overrides(overrides)
    start = time.time()
    out = subprocess.run([sys.executable, "-c", BARE, str(workdir), recipe, json.dumps(values)], cwd=REPO,
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bare run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["total_s"] = time.time() - start  # process start included, as for the engine
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="assets/recipes/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for both sides, e.g. sft.max_steps=50 (repeatable)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="engine_overhead_"))
    env = {**os.environ, "QAT_STUDIO_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    cold = time.time()
    # The base the prepare stage would build (the MXFP4-released one by default), so neither timed side builds it.
    subprocess.run([sys.executable, "-c", "import sys, torch; from pathlib import Path; "
                    "from engine.recipe.files import load_recipe; from engine.stages.prepare import ensure_embedded_base; "
                    "ensure_embedded_base(Path(sys.argv[1]), load_recipe(sys.argv[2]).model, "
                    "'cuda' if torch.cuda.is_available() else 'cpu')", str(root / "cache"), args.recipe],
                   cwd=REPO, env=env, check=True, capture_output=True)
    prepare_cold = time.time() - cold
    print(f"base model pre-training (cold, once): {prepare_cold:.1f} s", flush=True)

    engine = engine_side(args.recipe, args.set, root / "engine", env)
    print(f"engine side: {engine['total_s']:.1f} s in {engine['processes']} job processes; jobs {engine['jobs']}",
          flush=True)
    bare = bare_side(args.recipe, args.set, root / "bare", env)
    overhead = {k: engine["jobs"][k] - bare["jobs"].get(k, 0.0) for k in engine["jobs"]}
    result = {"recipe": args.recipe, "overrides": args.set, "prepare_cold_s": prepare_cold, "engine": engine,
              "bare": bare, "ratio": engine["total_s"] / bare["total_s"],
              "per_job_overhead_median_s": statistics.median(overhead.values()), "per_job_overhead_s": overhead}

    phases = ("start_imports_s", "load_s", "compute_s", "save_s")
    print(f"{'job':<24}{'engine s':>10}{'bare s':>10}{'overhead s':>12}   engine: imports / load / compute / save s")
    for key in engine["jobs"]:
        timing = engine["timing"].get(key) or {}
        parts = " / ".join("-" if timing.get(p) is None else f"{timing[p]:.1f}" for p in phases)
        print(f"{key:<24}{engine['jobs'][key]:>10.1f}{bare['jobs'].get(key, float('nan')):>10.1f}"
              f"{overhead[key]:>12.1f}   {parts}")
    print(f"\nbase model pre-training (cold, once): {prepare_cold:.1f} s")
    print(f"engine: {engine['total_s']:.1f} s in {engine['processes']} job processes; "
          f"bare: {bare['total_s']:.1f} s (imports {bare['imports_s']:.1f} s); ratio {result['ratio']:.3f}; "
          f"median per-job overhead {result['per_job_overhead_median_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
