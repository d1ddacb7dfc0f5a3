"""Forms generated from the typed configs (engine/recipe/configs.py): one component per field, no hand-written mapping.

    form = build_form("sft", SFTConfig, values)     # components laid out in rows, labelled with the field name
    form.read(data)                                 # {field: value} from a Gradio handler's {component: value} dict
    form.updates(section)                           # component values for a section dict (presets, recipe picks)
    assemble(base, {"sft": form.read(data)})        # -> Recipe, validated by the engine (RecipeError messages)

Field type -> component: bool -> Checkbox, Literal -> Dropdown, list[Literal] -> CheckboxGroup (formats use
FORMAT_LABELS), int / float -> Number (optional ones -> Textbox, '' = none), str / anything else -> Textbox.
The info text is the field's description plus its bounds and default. Bounds are shown, not enforced by the
component: the engine validates, so every error message comes from one place (and names the field).
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import gradio as gr
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from engine.recipe.configs import FORMAT_LABELS, Recipe
from engine.recipe.files import recipe_from_dict

# Fields whose list elements have friendly labels.
CHOICE_LABELS = {"formats": FORMAT_LABELS}


@dataclass
class Form:
    section: str  # recipe section, e.g. "sft"
    model: type[BaseModel]
    components: dict[str, gr.components.Component] = field(default_factory=dict)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return list(self.components.values())

    def read(self, data: dict) -> dict:
        """The section's values from a handler's {component: value} dict (inputs given as a set)."""
        fields = self.model.model_fields
        return {name: from_component(fields[name], data[comp]) for name, comp in self.components.items()}

    def read_list(self, values: list) -> dict:
        """The same from positional values, in `inputs` order."""
        return self.read(dict(zip(self.inputs, values)))

    def updates(self, section: dict) -> list:
        """Component values for a section dict; fields it lacks get their defaults."""
        defaults = self.model().model_dump(mode="json")
        fields = self.model.model_fields
        return [list(section.get(name, defaults[name]) or []) if isinstance(comp, gr.CheckboxGroup)  # lists as lists
                else to_component(fields[name], section.get(name, defaults[name]))
                for name, comp in self.components.items()]


def build_form(section: str, model: type[BaseModel], values: dict | None = None, *, only: list[str] | None = None,
               skip: tuple[str, ...] = (), custom: dict[str, Any] | None = None, per_row: int = 3) -> Form:
    """Create the components (inside the current Blocks context) for `model`'s fields, `per_row` to a row.

    custom: {field: factory(label, info, value) -> component} for fields that need a special widget (it gets the
    config value as is; a CheckboxGroup's value is a list both ways).
    """
    values = {**model().model_dump(mode="json"), **(values or {})}
    names = [n for n in (only or model.model_fields) if n not in skip]
    form = Form(section, model)
    for start in range(0, len(names), per_row):
        with gr.Row(equal_height=False):
            for name in names[start:start + per_row]:
                info = field_info(model.model_fields[name])
                factory = (custom or {}).get(name)
                if factory:  # a custom widget gets the config value itself
                    form.components[name] = factory(name, info, values.get(name))
                    continue
                value = to_component(model.model_fields[name], values.get(name))
                form.components[name] = component_for(name, model.model_fields[name], value, info)
    return form


def component_for(name: str, info_: FieldInfo, value: Any, info: str) -> gr.components.Component:
    base, is_list = unwrap(info_.annotation)
    common = {"label": name, "info": info}
    if is_list and get_origin(base) is Literal:
        labels = CHOICE_LABELS.get(name, {})
        choices = [(labels.get(c, c), c) for c in get_args(base)]
        return gr.CheckboxGroup(choices=choices, value=value, **common)
    if base is bool:
        return gr.Checkbox(value=bool(value), **common)
    if base in (int, float) and optional(info_):  # a Number cannot be empty in the browser (it shows 0)
        return gr.Textbox(value=value, placeholder="none", **common)
    if get_origin(base) is Literal:
        return gr.Dropdown(choices=list(get_args(base)), value=value, **common)
    if base is int and not is_list:
        return gr.Number(value=value, precision=0, **common)
    if base is float:
        return gr.Number(value=value, step=_float_step(value), **common)
    return gr.Textbox(value=value, **common)


def _float_step(value: Any) -> float:
    """A spinner step of about a tenth of the value (2e-5 -> 1e-6); the typed value is what counts."""
    if isinstance(value, (int, float)) and value:
        from math import floor, log10

        return 10 ** (floor(log10(abs(value))) - 1)
    return 0.01


def unwrap(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) with Optional[...] removed."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if get_origin(annotation) is list:
        return get_args(annotation)[0], True
    return annotation, False


def optional(info_: FieldInfo) -> bool:
    return get_origin(info_.annotation) in (typing.Union, types.UnionType) and type(None) in get_args(info_.annotation)


def field_info(info_: FieldInfo) -> str:
    """Help text: the description, then bounds and default, e.g. '... · range (0, 1] · default 2e-05'."""
    parts = [info_.description or ""]
    bounds = _bounds(info_)
    if bounds:
        parts.append(bounds)
    default = info_.get_default(call_default_factory=True)
    parts.append(f"default {_show(default)}")
    return " · ".join(p for p in parts if p)


def _bounds(info_: FieldInfo) -> str:
    low = high = None
    for meta in info_.metadata:
        for attr, symbol in (("gt", "("), ("ge", "[")):
            if getattr(meta, attr, None) is not None:
                low = (symbol, getattr(meta, attr))
        for attr, symbol in (("lt", ")"), ("le", "]")):
            if getattr(meta, attr, None) is not None:
                high = (symbol, getattr(meta, attr))
    if low and high:
        return f"range {low[0]}{_show(low[1])}, {_show(high[1])}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '≥'} {_show(low[1])}"
    if high:
        return f"{'<' if high[0] == ')' else '≤'} {_show(high[1])}"
    return ""


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[]"
    return str(value)


def to_component(info_: FieldInfo, value: Any) -> Any:
    """A config value as its component shows it (None -> '' for text, lists of numbers -> '0,1')."""
    base, is_list = unwrap(info_.annotation)
    if is_list and get_origin(base) is not Literal:
        return "" if value is None else ",".join(str(v) for v in value)
    if value is None and (optional(info_) or base is str):
        return ""
    return value


def from_component(info_: FieldInfo, value: Any) -> Any:
    """A component's value as the config expects it. Text we cannot convert is passed through unchanged, so the
    engine's validation reports it (with the field name) instead of a second message source here."""
    base, is_list = unwrap(info_.annotation)
    if isinstance(value, str):
        value = value.strip()
        if value == "" and optional(info_):
            return None
        if is_list and get_origin(base) is not Literal:
            try:
                return [base(part.strip()) for part in value.replace(";", ",").split(",") if part.strip()]
            except (TypeError, ValueError):
                return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if is_list and value is None and not optional(info_):
        return []
    if is_list and value == [] and optional(info_):  # nothing ticked in a picker = not given
        return None
    return value


def assemble(base: dict, sections: dict[str, dict], filename: str = "<form>") -> Recipe:
    """The base recipe dict with whole sections replaced by form values, validated by the engine.
    Raises engine.recipe.files.RecipeError with 'file: field: message' lines."""
    data = copy.deepcopy(base)
    for section, values in sections.items():
        if section == "":  # top-level fields (name)
            data.update(values)
        else:
            data[section] = {**data.get(section, {}), **values}
    return recipe_from_dict(data, filename)
