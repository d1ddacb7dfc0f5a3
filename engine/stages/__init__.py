"""The recipe's stages. Each is a plain function `run(ctx) -> dict` reading its config from `ctx.recipe`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = ("prepare", "sft", "ptq", "qat", "evaluate", "export", "report")


def stage_function(stage: str) -> Callable:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return importlib.import_module(f"engine.stages.{stage}").run
