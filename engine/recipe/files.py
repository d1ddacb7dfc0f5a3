"""Recipe files: YAML <-> the typed `Recipe`, with errors that name the file, line and field.

PyYAML gives values but forgets where they came from, and it silently keeps the last of two duplicate keys; we
compose the node tree ourselves to keep line numbers and to reject duplicates. Validation itself is pydantic's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from engine.recipe.configs import Recipe


class RecipeError(ValueError):
    """A recipe that cannot be used; `problems` are 'file:line: field: message' strings."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError([f"{path}: recipe file not found; pass an existing .yaml file (e.g. assets/recipes/demo.yaml)"])
    if path.is_dir():
        raise RecipeError([f"{path}: is a directory; pass a recipe .yaml file"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8"]) from None
    except OSError as exc:
        raise RecipeError([f"{path}: cannot be read ({exc.strerror}); check the path and its permissions"]) from None
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, filename: str = "<recipe>", overrides: dict[str, Any] | None = None) -> Recipe:
    data, lines = _yaml_with_lines(text, filename)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return recipe_from_dict(data, filename, lines)


def recipe_from_dict(data: dict, filename: str = "<recipe>", lines: dict[tuple, int] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([_describe(err, filename, lines or {}) for err in exc.errors()]) from None


def recipe_to_yaml(recipe: Recipe, with_help: bool = True) -> str:
    """The recipe as YAML; with_help adds each field's help text as a comment above it."""
    out: list[str] = []
    _emit(recipe, out, indent=0, with_help=with_help)
    return "\n".join(out) + "\n"


def _emit(model: BaseModel, out: list[str], indent: int, with_help: bool) -> None:
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if with_help and field.description:
            out.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:")
            _emit(value, out, indent + 2, with_help)
        else:
            dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            dumped = dumped.removesuffix("\n...").strip()
            out.append(f"{pad}{name}: {dumped}")


def _describe(err: dict, filename: str, lines: dict[tuple, int]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc) or "(top level)"
    line = _nearest_line(loc, lines)
    where = f"{filename}:{line}" if line else filename
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        hint = f"unknown key '{loc[-1]}'; remove it or fix its spelling"
        parent = loc[:-1]
        known = _known_keys(parent)
        if known:
            hint += f" (known keys here: {', '.join(known)})"
        return f"{where}: {field}: {hint}"
    if kind == "missing":
        return f"{where}: {field}: required value missing; add it"
    return f"{where}: {field}: {msg} (got {err.get('input')!r})"


def _known_keys(parent: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in parent:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _nearest_line(loc: tuple[str, ...], lines: dict[tuple, int]) -> int | None:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def _yaml_with_lines(text: str, filename: str) -> tuple[dict, dict[tuple, int]]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise RecipeError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"]) from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError([f"{filename}:1: the recipe must be a mapping of sections (model:, data:, sft:, ...)"])
    lines: dict[tuple, int] = {}
    problems: list[str] = []
    _walk(root, (), lines, problems, filename)
    if problems:
        raise RecipeError(problems)
    return yaml.safe_load(text) or {}, lines


def _walk(node: yaml.Node, path: tuple, lines: dict, problems: list[str], filename: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            dotted = ".".join((*path, key))
            problems.append(f"{filename}:{line}: {dotted}: duplicate key (first at line {seen[key]}); keep one")
        seen[key] = line
        lines[(*path, key)] = line
        _walk(value_node, (*path, key), lines, problems, filename)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError([f"--{dotted}: '{part}' is not a section"])
    node[parts[-1]] = value
