"""From a recipe to queued jobs: the recipe's stages as a dependency graph in storage.

    prepare ─► eval original
       └─► sft ─► eval sft
             ├─► ptq:mxfp4 ─► eval ptq:mxfp4
             │      └─► qat:mxfp4 ─► eval qat:mxfp4
             │             └─► export:mxfp4
             └─► (same per format)
    report (after everything): summary.json + the results table
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.recipe.configs import Recipe
from engine.runtime.workspace import run_dir
from storage import Store


@dataclass
class JobSpec:
    key: str  # unique within the run, e.g. "qat:mxfp4", "evaluate:qat:mxfp4"
    stage: str  # prepare | sft | ptq | qat | evaluate | export | report
    fmt: str = "bf16"
    target: str | None = None  # for evaluate: the key of the model it evaluates
    deps: list[str] = field(default_factory=list)
    source: str | None = None  # the key of the model this stage starts from


def plan(recipe: Recipe) -> list[JobSpec]:
    # Jobs run in this order when their dependencies allow: SFT goes before the original model's evaluation so the
    # first loss point shows up as early as possible.
    jobs = [JobSpec("prepare", "prepare")]
    trained = "prepare"
    if recipe.sft.enabled:
        jobs.append(JobSpec("sft", "sft", deps=["prepare"]))
        trained = "sft"
    jobs.append(JobSpec("evaluate:original", "evaluate", target="prepare", deps=["prepare"]))
    if recipe.sft.enabled:
        jobs.append(JobSpec("evaluate:sft", "evaluate", target="sft", deps=["sft"]))
    for fmt in recipe.ptq.formats:
        ptq, qat = f"ptq:{fmt}", f"qat:{fmt}"
        jobs += [
            JobSpec(ptq, "ptq", fmt, deps=[trained], source=trained),
            JobSpec(f"evaluate:{ptq}", "evaluate", fmt, target=ptq, deps=[ptq]),
        ]
        final = ptq
        if recipe.qat.enabled:
            jobs += [
                JobSpec(qat, "qat", fmt, deps=[ptq]),
                JobSpec(f"evaluate:{qat}", "evaluate", fmt, target=qat, deps=[qat]),
            ]
            final = qat
        if recipe.export.enabled:
            jobs.append(JobSpec(f"export:{fmt}", "export", fmt, target=final, deps=[final]))
    jobs.append(JobSpec("report", "report", deps=[j.key for j in jobs if j.stage in ("evaluate", "export")]))
    return jobs


def resources_for(recipe: Recipe, cuda_available: bool) -> str:
    """The device a run's jobs hold: the engine runs one job per resource at a time."""
    device = recipe.hardware.device
    if device == "cpu" or (device == "auto" and not cuda_available):
        return "cpu"
    gpus = recipe.hardware.gpus or [0]
    return ",".join(f"cuda:{g}" for g in gpus)


def enqueue(store: Store, recipe: Recipe, workdir: Path, cuda_available: bool | None = None) -> str:
    """Create the run and its queued jobs; returns the run id."""
    # Where the jobs run is known before the run exists: asking CUDA imports torch (seconds), and a run listed
    # without its jobs meanwhile is one a reader (the app, `status`, a test) takes for empty.
    resources = resources_for(recipe, _cuda(cuda_available))
    run_id = store.create_run(recipe.name, recipe.model_dump(mode="json"))
    root = run_dir(workdir, run_id)
    root.mkdir(parents=True, exist_ok=True)
    store.update_run(run_id, run_dir=str(root))
    _add_jobs(store, run_id, plan(recipe), {}, resources)
    return run_id


def extend(store: Store, run_id: str, recipe: Recipe, cuda_available: bool | None = None) -> list[int]:
    """Add the stages `recipe` has and the run lacks (e.g. QAT for another format after SFT finished).

    The run's recipe becomes `recipe`; existing jobs are kept as they are; the report is redone at the end.
    """
    existing = {job_key(j): j for j in store.list_jobs(run_id)}
    specs = [s for s in plan(recipe) if s.key not in existing or s.stage == "report"]
    store.update_run(run_id, recipe=recipe.model_dump(mode="json"))
    report = existing.pop("report", None)
    ids = {key: job["id"] for key, job in existing.items()}
    added = _add_jobs(store, run_id, [s for s in specs if s.stage != "report"], ids,
                      resources_for(recipe, _cuda(cuda_available)))
    report_spec = next(s for s in specs if s.stage == "report")
    deps = [ids[d] for d in report_spec.deps]
    if report is None:
        added += _add_jobs(store, run_id, [report_spec], ids, "report")
    elif report["status"] != "running":
        store.update_job(report["id"], depends_on=deps)
        store.requeue_job(report["id"])
    store.refresh_run_status(run_id)
    return added


def _add_jobs(store: Store, run_id: str, specs: list[JobSpec], ids: dict[str, int], device_resource: str) -> list[int]:
    added = []
    for spec in specs:
        ids[spec.key] = store.add_job(
            run_id,
            spec.stage,
            fmt=spec.fmt,
            target=spec.target,
            config={"key": spec.key, **({"source": spec.source} if spec.source else {})},
            depends_on=[ids[d] for d in spec.deps],
            resources="report" if spec.stage == "report" else device_resource,
        )
        added.append(ids[spec.key])
    return added


def _cuda(cuda_available: bool | None) -> bool:
    if cuda_available is None:
        import torch

        return torch.cuda.is_available()
    return cuda_available


def job_key(job: dict) -> str:
    return job["config"]["key"]


def find_job(store: Store, run_id: str, key: str) -> dict | None:
    return next((j for j in store.list_jobs(run_id) if job_key(j) == key), None)
