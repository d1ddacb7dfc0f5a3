"""CLI flags generated from the typed recipe: `--sft.learning_rate 1e-4`, `--ptq.formats mxfp4 nvfp4`, ...

One flag per leaf field, with its help text and default from engine/recipe/configs.py, so the CLI never drifts from
the recipe YAML or the UI forms.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin


from engine.recipe.configs import leaf_fields


class StudioParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets two lines (the problem, naming the flag as typed, and where to read the help)
    instead of the whole usage: with one flag per recipe field the usage alone is ~70 lines."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see: {self.prog} --help)\n")


_METAVAR = {int: "INT", float: "FLOAT", str: "TEXT"}


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe overrides (each defaults to the recipe file's value)")
    for dotted, field in leaf_fields():
        base, is_list = _unwrap(field.annotation)
        # metavar: argparse would otherwise show the dest, SET__SFT.LEARNING_RATE, in --help and in errors.
        kwargs: dict[str, Any] = {"dest": f"set__{dotted}", "default": argparse.SUPPRESS, "help": field.description,
                                  "metavar": _METAVAR.get(base, "VALUE")}
        if base is bool:
            kwargs.update(type=_parse_bool, metavar="{true,false}")
        elif get_origin(base) is Literal:
            kwargs.update(choices=list(get_args(base)), metavar="{" + ",".join(map(str, get_args(base))) + "}")
        elif base in (int, float):
            kwargs.update(type=base)
        if is_list:
            kwargs["nargs"] = "*"
        group.add_argument(f"--{dotted}", **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {key.removeprefix("set__"): value for key, value in vars(args).items() if key.startswith("set__")}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional[...] and list[...] so the flag gets the element type."""
    is_list = False
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if get_origin(annotation) is list:
        is_list = True
        annotation = get_args(annotation)[0]
    return annotation, is_list


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
