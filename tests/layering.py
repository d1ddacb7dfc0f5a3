"""Which part of the code may import which, read from the source (AST), and a check of it.

The rule, one line per part (engine/*/__init__.py says the same in words):
the lower parts never reach up, `engine/` never reaches the faces (ui/, cli/), storage/ is a leaf.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# part -> the parts it may import (besides itself and third-party libraries)
ALLOWED: dict[str, set[str]] = {
    "storage": set(),
    "engine.recipe": set(),
    "engine.runtime": {"engine.recipe", "storage"},
    "engine.data": {"engine.recipe"},
    "engine.fp4": {"engine.recipe", "engine.data"},
    "engine.evaluation": {"engine.recipe", "engine.data", "engine.fp4", "storage"},
    "engine.training": {"engine.recipe", "engine.data", "engine.fp4", "engine.runtime", "storage"},
    "engine.serving": {"engine.data", "engine.fp4", "engine.runtime", "storage"},
    "engine.stages": {"engine.recipe", "engine.runtime", "engine.data", "engine.fp4", "engine.evaluation",
                      "engine.training", "engine.serving", "storage"},
    "cli": {"engine", "storage"},
    "ui": {"engine", "storage"},
}
PARTS = sorted(ALLOWED, key=len, reverse=True)
OURS = ("engine", "storage", "ui", "cli")


def part_of(module: str) -> str | None:
    for part in PARTS:
        if module == part or module.startswith(part + "."):
            return part
    return "engine" if module == "engine" else None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ours in the file; `from engine.fp4 import x` gives
    engine.fp4.x when x is a module. Imports under `if TYPE_CHECKING:` are skipped (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] in OURS)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] in OURS:
                    for a in child.names:
                        sub = f"{child.module}.{a.name}"
                        found.append((child.lineno, sub if _is_module(sub) else child.module))
            visit(child, depth + 1)

    visit(tree, 0)
    return found


def _is_module(dotted: str) -> bool:
    base = ROOT / Path(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks ALLOWED, as 'file:line: A imports B'."""
    out = []
    for folder in ("engine", "storage", "cli", "ui"):
        for path in sorted((root / folder).rglob("*.py")):
            me = module_name(path, root)
            mine = part_of(me)
            if mine in (None, "engine"):  # engine/__init__.py sets an env var and imports nothing of ours
                continue
            for line, target in imports(path):
                theirs = part_of(target)
                if theirs is None or theirs == mine:
                    continue
                allowed = ALLOWED[mine]
                if theirs in allowed or (theirs.startswith("engine") and "engine" in allowed):
                    continue
                out.append(f"{path.relative_to(root)}:{line}: {mine} imports {target} ({theirs} is not in {sorted(allowed)})")
    return out


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles among module-level imports (those that run when a module is imported)."""
    graph: dict[str, set[str]] = {}
    for folder in ("engine", "storage", "cli", "ui"):
        for path in (root / folder).rglob("*.py"):
            graph[module_name(path, root)] = {t for _, t in imports(path, top_level_only=True)}
    cycles, state = [], {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    return cycles
