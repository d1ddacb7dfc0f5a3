"""`--set FIELD=VALUE` recipe overrides of the benchmark scripts, as the dict engine.recipe.files.load_recipe takes."""

from __future__ import annotations

import json


def parse_overrides(items: list[str]) -> dict:
    """{'sft.max_steps': 50, 'ptq.formats': ['mxfp4'], 'eval.batch_size': 'auto'}: each value read as JSON where it
    is JSON (numbers, booleans, lists), else kept as the string it is."""
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values
