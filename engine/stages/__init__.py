"""The recipe's stages, on top of the other parts. Each is a plain function `run(ctx) -> dict` reading its config
from `ctx.recipe`; `job` is the process that runs one (`python -m engine.stages.job`).

May import every part of the engine and `storage`; no other part of the engine imports a stage."""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = ("prepare", "sft", "ptq", "qat", "evaluate", "export", "report")


def stage_function(stage: str) -> Callable:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return importlib.import_module(f"engine.stages.{stage}").run
