"""What both faces of the product (the app and the CLI) do to runs before and after the engine has them:
check a recipe's inputs before a run exists, and re-queue a run's unfinished jobs.

Writes nothing when the input is bad: every problem is a `UserError` naming the file, line and field.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from engine.recipe.configs import Recipe
from engine.recipe.files import RecipeError, load_recipe
from engine.runtime import gpu_memory, workspace

log = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input: printed as is (no traceback), exit status 2."""


def validate_inputs(recipe: Recipe) -> None:
    """Everything we can check before a run exists: model source, block size, dataset rows and lengths.
    Writes nothing; raises UserError naming the file, line and field."""
    from engine.data.chat_data import DataError, check_lengths, load_chat_dataset

    check_gpu_memory_limit(recipe)
    model_dir = _model_dir(recipe.model.source)
    _check_block_size(recipe, model_dir)
    tokenizer = _tokenizer_for(recipe, model_dir)
    try:
        for source in filter(None, (recipe.data.source, recipe.data.eval_source)):
            rows = load_chat_dataset(source, root=workspace.ASSETS)
            issues = check_lengths(rows, tokenizer, recipe.data.max_length, source=source) if tokenizer else []
            if issues:
                raise DataError(issues)
    except DataError as exc:
        raise UserError(str(exc)) from None


def check_gpu_memory_limit(recipe: Recipe, cards: list[dict] | None = None) -> None:
    """hardware.gpu_memory_limit_gib against the run's GPUs (NVML's view, `cards` = telemetry.gpus()'s dicts; None:
    ask NVML). A limit above a card's memory is a UserError; with none of the run's GPUs visible here (a CPU machine,
    another host's card) a logged warning: the job checks again on its GPU and fails there if the card is smaller."""
    limit = recipe.hardware.gpu_memory_limit_gib
    if limit is None or recipe.hardware.device == "cpu":
        return
    note = None
    if cards is None:
        from engine.runtime import telemetry

        cards, note = telemetry.gpus()
    wanted = recipe.hardware.gpus or [0]  # the engine's GPU indices are NVML's (CUDA_DEVICE_ORDER=PCI_BUS_ID)
    ours = [card for card in cards if card["index"] in wanted]
    if not ours:
        log.warning("%s = %g GiB not checked: GPU %s not visible here (%s); the job checks it on its GPU and "
                    "ignores it on CPU", gpu_memory.FIELD, limit, ", ".join(map(str, wanted)),
                    note or f"{len(cards)} GPU(s) seen")
        return
    problem = gpu_memory.limit_problem(limit, ours)
    if problem:
        raise UserError(problem)


def _model_dir(source: str) -> Path | None:
    """The local directory behind model.source (the embedded model's tokenizer dir stands in), or None for a hub id."""
    if source == "embedded:tiny-gpt-oss":
        return None
    if source.startswith("embedded:"):
        raise UserError(f"model.source: unknown embedded model {source!r}; the embedded one is 'embedded:tiny-gpt-oss'")
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise UserError(f"model.source: {source}: no model directory with a config.json there; "
                        "pass a gpt-oss checkpoint directory or a hub id like openai/gpt-oss-20b")
    return local if looks_local else None


def _check_block_size(recipe: Recipe, model_dir: Path | None) -> None:
    """FP4 blocks run along the experts' input dims (hidden size, intermediate size): the block must divide both."""
    if recipe.ptq.block_size is None or not recipe.ptq.formats:
        return
    if model_dir is None and recipe.model.source != "embedded:tiny-gpt-oss":
        return  # a hub id: dims known only after download; the PTQ stage checks again
    config = json.loads((model_dir / "config.json").read_text()) if model_dir else {"hidden_size": 128,
                                                                                     "intermediate_size": 128}
    for dim_name in ("hidden_size", "intermediate_size"):
        dim = config.get(dim_name)
        if dim and dim % recipe.ptq.block_size:
            raise UserError(f"ptq.block_size: {recipe.ptq.block_size} does not divide the model's {dim_name} ({dim}); "
                            f"choose a block size that divides it (e.g. 32 or 16)")


def _tokenizer_for(recipe: Recipe, model_dir: Path | None):
    """The tokenizer the run will use, when it is on disk (embedded or local); None for a hub id."""
    if recipe.model.source == "embedded:tiny-gpt-oss":
        return _fast_tokenizer(workspace.ASSETS / "tokenizer")
    if model_dir is None or not any(model_dir.glob("tokenizer*")):
        return None
    if (model_dir / "tokenizer.json").exists() and not recipe.model.trust_remote_code:
        return _fast_tokenizer(model_dir)
    from engine.fp4 import model_io

    return model_io.load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _fast_tokenizer(directory: Path):
    """The tokenizer from its tokenizer.json, loaded without torch: `launch.py run` checks lengths before the run
    exists, and AutoTokenizer imports torch (6.5 s on the H200 machine, 2026-12-03) only to count tokens. Same ids and
    chat template as AutoTokenizer's (tests/test_runs.py compares them). Cached: the token-length cache keys on it."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def load_and_validate(recipe_path: str, overrides: dict) -> Recipe:
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as exc:
        raise UserError(str(exc)) from None
    validate_inputs(recipe)
    return recipe


def settle(store) -> None:
    """With no engine process alive, jobs still marked running whose processes are gone (power cut, killed engine,
    reboot) become 'interrupted': what `status` shows and what `resume` picks up. An engine whose process lives
    settles its own jobs, even while its heartbeat lags (it may be between claiming a job and starting it)."""
    from engine.runtime import processes

    if not any(processes.engine_alive(e, max_age_s=float("inf")) for e in store.running_engines()):
        processes.settle_dead_jobs(store)


def resume_note(store, job: dict) -> str:
    """Where a re-queued job continues: a training job from its newest checkpoint or from step 0; others rerun."""
    if job["stage"] not in ("sft", "qat"):
        return "runs again"
    run = store.get_run(job["run_id"])
    fmt = job["fmt"] if job["stage"] == "qat" else None
    return workspace.resume_point(Path(run["run_dir"]), job["stage"], fmt)


def resume_run(store, run_id: str) -> list[int]:
    """Re-queue the run's unfinished jobs (jobs whose process died count as interrupted); trainers pick up their
    last checkpoint."""
    settle(store)
    ids = []
    for job in store.list_jobs(run_id):
        if job["status"] in ("failed", "interrupted", "cancelled"):
            store.requeue_job(job["id"])
            ids.append(job["id"])
    store.refresh_run_status(run_id)
    return ids
