"""Where a recipe's compute time goes, stage by stage, in one process (no engine): wall time, host syncs, peak memory
and, with --profile, torch.profiler's busiest ops and kernel-launch counts per stage.

    python bench/demo_gpu_profile.py [--recipe assets/recipes/demo.yaml] [--set eval.batch_size=64 ...]
                                     [--profile [--top 8]] [--json out.json]

Runs every job of the recipe in dependency order, the way bench/engine_overhead.py's bare side does (one loaded
model shared between consecutive jobs), after building the embedded base once as the prepare stage does (BF16
pre-training, then the MXFP4 release; untimed, cached in a temporary directory unless $QAT_STUDIO_CACHE is set). Per stage:
  wall s      the stage function's wall time (torch.cuda.synchronize() before the clock stops);
  syncs       GPU->host synchronisations, counted with torch.cuda.set_sync_debug_mode('warn') (CUDA only: each
              .item(), .tolist(), nonzero(), a D2H copy...); the cost of a launch-bound tiny model is mostly these;
  peak GiB    torch.cuda.max_memory_allocated during the stage (CUDA only);
  --profile   the stage under torch.profiler (slower: read its wall times as relative), plus the top ops by self
              device time (self CPU time on CPU) and the number of kernel launches (cudaLaunchKernel and friends).
Run without --profile for honest wall times, with it to see the ops.

Result: a table on stdout (one row per stage, then the profiler's top ops per stage with --profile); --json FILE
writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


@contextmanager
def counting_syncs(cuda: bool):
    """Yields a one-item list that ends up holding the number of synchronising CUDA calls made inside."""
    import torch

    count = [0]
    if not cuda:
        yield count
        return
    previous = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchronizing" in str(message):
            count[0] += 1
        else:
            previous(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=".*synchronizing")  # each one, not once per call site
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous


def top_ops(prof, cuda: bool, top: int) -> dict:
    """The busiest ops by self device time (CUDA) or self CPU time, and the kernel launches, from one profile."""
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    busiest = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:top]
    return {
        "launches": sum(e.count for e in events if e.key in LAUNCHES),
        "top": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr, 0) / 1e3} for e in busiest],
    }


def run_recipe(recipe_path: str, overrides: dict, workdir: Path, profile: bool, top: int) -> list[dict]:
    import torch

    from engine.recipe.files import load_recipe
    from engine.runtime import workspace
    from engine.runtime.context import Context, pick_device
    from engine.runtime.pipeline import enqueue
    from engine.stages import stage_function
    from storage import Store

    recipe = load_recipe(recipe_path, overrides)
    store = Store(workspace.db_path(workdir))
    run_id = enqueue(store, recipe, workdir)
    models, rows = {}, []
    while (job := store.claim_job(pid=None)) is not None:
        ctx = Context(store, workdir, store.get_run(run_id), job, recipe, pick_device(recipe, job["resources"]),
                      models=models)
        cuda = ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        profiler = torch.profiler.profile(activities=activities) if profile else nullcontext()
        start = time.perf_counter()
        with counting_syncs(cuda) as syncs, profiler as prof:
            stage_function(job["stage"])(ctx)
            if cuda:
                torch.cuda.synchronize()
        row = {"stage": job["config"]["key"], "wall_s": time.perf_counter() - start,
               "syncs": syncs[0] if cuda else None,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        if profile:
            row.update(top_ops(prof, cuda, top))
        store.finish_job(job["id"], "succeeded")
        rows.append(row)
        print(f"  {row['stage']}: {row['wall_s']:.1f} s", flush=True)
    return rows


def print_table(rows: list[dict], profile: bool) -> None:
    def show(value, fmt):
        return "-" if value is None else format(value, fmt)

    print(f"\n{'stage':<24}{'wall s':>9}{'syncs':>9}{'peak GiB':>10}" + (f"{'launches':>10}" if profile else ""))
    for r in rows:
        print(f"{r['stage']:<24}{r['wall_s']:>9.2f}{show(r['syncs'], 'd'):>9}{show(r['peak_gib'], '.2f'):>10}"
              + (f"{r['launches']:>10d}" if profile else ""))
    print(f"{'total':<24}{sum(r['wall_s'] for r in rows):>9.2f}")
    if profile:
        for r in rows:
            print(f"\n{r['stage']}: top ops by self time")
            for op in r["top"]:
                print(f"    {op['self_ms']:>10.1f} ms {op['calls']:>8d} calls  {op['op'][:70]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="assets/recipes/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override, e.g. sft.max_steps=20 or eval.batch_size=64 (repeatable)")
    parser.add_argument("--profile", action="store_true", help="run each stage under torch.profiler")
    parser.add_argument("--top", type=int, default=8, help="ops listed per stage with --profile")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from bench.lib.overrides import parse_overrides
    from engine.recipe.files import load_recipe
    from engine.stages.prepare import ensure_embedded_base

    root = Path(tempfile.mkdtemp(prefix="demo_gpu_profile_"))
    cache = Path(os.environ.setdefault("QAT_STUDIO_CACHE", str(root / "cache")))
    overrides = parse_overrides(args.set)
    recipe = load_recipe(args.recipe, overrides)
    device = "cuda" if torch.cuda.is_available() and recipe.hardware.device != "cpu" else "cpu"
    if recipe.model.source.startswith("embedded:"):
        cold = time.perf_counter()
        # what the prepare stage builds (the MXFP4 release too), so that stage times the same work as on a warm cache
        ensure_embedded_base(cache, recipe.model, device, log=lambda _: None)
        print(f"base model pre-training (untimed below): {time.perf_counter() - cold:.1f} s", flush=True)
    rows = run_recipe(args.recipe, overrides, root / "work", args.profile, args.top)
    print_table(rows, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "overrides": args.set, "device": device,
                                               "profile": args.profile, "stages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
