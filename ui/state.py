"""The small shared state every tab's `build(state)` receives.

    state.workdir        Path of the workspace (studio.db, runs/, uploads/, cache/).
    state.store()        the process-wide storage.Store for it (thread-safe; Gradio runs handlers on a pool).
    state.run            gr.Dropdown in the header: the selected run id ("" or None = none). Use it as an input of
                         anything run-specific; to select a run (e.g. after starting one) return
                         `state.select_run(run_id)` for it. It is mirrored into the page URL (?run=ID), so a reload
                         keeps the selection; with no ?run the newest run is selected.
    state.base           gr.State: the recipe draft's base, the picked recipe file as a dict.
    state.picker         gr.Dropdown on the Recipe tab: the name of that recipe file (assets/recipes/NAME.yaml).
    state.forms          {section: ui.forms.Form} registered by the tabs (data, sft, qat, ptq, model, ...);
                         `state.recipe_inputs()` + `state.draft_recipe(data)` turn base + forms into a Recipe.
    state.tab_timer(tab) a gr.Timer for live refresh that ticks only while `tab` is the selected tab (app.py
                         switches them), so hidden tabs cost nothing. Wire `timer.tick(...)` to your refresh,
                         or `gr.on(state.shown(tab), ...)` to also refresh the moment the tab is opened.
    state.after_build(f) run f() once every tab exists (to wire events whose inputs live in other tabs).
    state.goto_tab       gr.Tabs of the app, to switch tabs from a handler: return gr.Tabs(selected="history").

Deploy and Chat (ui/tab_deploy.py, ui/tab_chat.py) use the same: `build(state)` inside their gr.Tab, read
`state.run`, and `state.store().list_servers()` / `add_server(...)` for serving.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from engine.runtime import workspace
from engine.recipe.configs import Recipe
from storage import Store
from ui.forms import Form, assemble

RECIPES_DIR = workspace.ASSETS / "recipes"
DEFAULT_RECIPE = "demo"
_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def store_for(workdir: Path) -> Store:
    with _stores_lock:
        if workdir not in _stores:
            _stores[workdir] = Store(workspace.db_path(workdir))
        return _stores[workdir]


@dataclass
class AppState:
    workdir: Path
    run: gr.Dropdown | None = None
    base: gr.State | None = None
    picker: gr.Dropdown | None = None
    goto_tab: gr.Tabs | None = None
    forms: dict[str, Form] = field(default_factory=dict)
    tabs: dict[str, gr.Tab] = field(default_factory=dict)  # app.py adds each gr.Tab before building its content
    timers: dict[str, gr.Timer] = field(default_factory=dict)
    _deferred: list[Callable[[], None]] = field(default_factory=list)

    def store(self) -> Store:
        return store_for(self.workdir)

    # -- live refresh ---------------------------------------------------------------------------------------------
    def tab_timer(self, tab: str, every: float = 1.5) -> gr.Timer:
        """The tab's refresh timer; only the initially shown tab (recipe) starts active."""
        if tab not in self.timers:
            self.timers[tab] = gr.Timer(every, active=(tab == "recipe"))
        return self.timers[tab]

    def shown(self, tab: str, every: float = 1.5) -> list:
        """Triggers that refresh `tab`: the user opening it, then each tick of its timer while it stays open. Use
        these rather than `state.run.change` for hidden tabs: a page load then refreshes only what is visible."""
        return [self.tabs[tab].select, self.tab_timer(tab, every).tick]

    def after_build(self, fn: Callable[[], None]) -> None:
        self._deferred.append(fn)

    def finish(self) -> None:
        for fn in self._deferred:
            fn()
        self._deferred.clear()

    # -- the recipe draft -----------------------------------------------------------------------------------------
    def add_form(self, form: Form) -> Form:
        self.forms[form.section] = form
        return form

    def recipe_inputs(self) -> set:
        """Inputs (as a set: handlers get a {component: value} dict) that make up the draft recipe."""
        return {self.base, *(c for form in self.forms.values() for c in form.inputs)}

    def draft(self, data: dict) -> dict:
        """The draft as {section: values} from the forms, on top of the base recipe."""
        return {section: form.read(data) for section, form in self.forms.items()}

    def draft_recipe(self, data: dict, **replace: dict) -> Recipe:
        """Base + forms (+ `replace` sections on top), validated by the engine; raises RecipeError."""
        sections = self.draft(data)
        for section, values in replace.items():
            sections[section] = {**sections.get(section, {}), **values}
        return assemble(data[self.base], sections)

    def form_updates(self, recipe: dict) -> list:
        """Values for every registered form's components from a recipe dict (in `form_outputs` order)."""
        return [value for section, form in self.forms.items()
                for value in form.updates(recipe if section == "" else recipe.get(section, {}))]

    def form_outputs(self) -> list:
        return [c for form in self.forms.values() for c in form.inputs]

    # -- runs -----------------------------------------------------------------------------------------------------
    def run_choices(self) -> list[tuple[str, str]]:
        return [(f"{r['id']} · {r['name']} · {r['status']}", r["id"]) for r in self.store().list_runs()]

    def select_run(self, run_id: str | None) -> dict:
        """Update for `state.run`: fresh choices, `run_id` selected."""
        return gr.update(choices=self.run_choices(), value=run_id)


def skip_unchanged(cache: dict, values: list) -> list:
    """gr.skip() for each value equal to what this browser session already shows (no redraw, no flicker, less
    traffic on every timer tick). `cache` is the session's gr.State dict; values are compared by their repr."""
    import pandas as pd

    out = []
    for i, value in enumerate(values):
        key = value.to_json() if isinstance(value, pd.DataFrame) else repr(value)
        out.append(gr.skip() if cache.get(f"shown{i}") == key else value)
        cache[f"shown{i}"] = key
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe_file(name: str) -> Recipe:
    from engine.recipe.files import load_recipe

    return load_recipe(RECIPES_DIR / f"{name}.yaml")


def recipe_command(name: str, recipe: Recipe) -> str:
    """The exact CLI line reproducing `recipe`: the recipe file plus a flag per field that differs from it."""
    from engine.recipe.configs import leaf_fields

    file_values = _flat(load_recipe_file(name).model_dump(mode="json"))
    ours = _flat(recipe.model_dump(mode="json"))
    parts = [f".venv/bin/python launch.py run assets/recipes/{name}.yaml"]  # as README writes every command
    for dotted, _ in leaf_fields():
        if ours.get(dotted) != file_values.get(dotted):
            parts.append(f"--{dotted} {_flag_value(ours.get(dotted))}")
    return " \\\n    ".join(parts)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _flag_value(value) -> str:
    import shlex

    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(shlex.quote(str(v)) for v in value)
    if value is None:
        return "''"
    return shlex.quote(str(value))


_cuda: dict = {}


def cuda_available() -> bool:
    """Whether torch sees a GPU, asked once in a subprocess: CUDA's driver initialisation stays out of the
    long-lived web process, which only ever reads GPUs through NVML."""
    if "value" not in _cuda:
        code = "import torch; print(torch.cuda.is_available())"
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            _cuda["value"] = out.stdout.strip() == "True"
        except (OSError, subprocess.SubprocessError):
            _cuda["value"] = False
    return _cuda["value"]


def warm_up_in_background() -> None:
    """Answer the slow first-use questions in the background at start-up, so the first Run click does not wait for
    them: cuda_available() (a subprocess importing torch), and the embedded tokenizer that validates datasets before
    a run is queued (transformers and torch, 10-30 s on a busy 2-core machine). The web process holds torch from
    then on (+0.37 GiB resident, measured); it still never trains or evaluates."""
    def load_tokenizer() -> None:
        from engine.data.embedded_model import embedded_tokenizer

        embedded_tokenizer().apply_chat_template([[{"role": "user", "content": "hi"}]], tokenize=True)

    threading.Thread(target=cuda_available, name="warm-up-cuda", daemon=True).start()
    threading.Thread(target=load_tokenizer, name="warm-up-tokenizer", daemon=True).start()
