"""The engine's parts import only downward (tests/layering.py has the rule); no import cycles."""

from __future__ import annotations

import shutil

from layering import ALLOWED, ROOT, import_cycles, violations


def test_every_import_follows_the_layering():
    assert violations() == []


def test_no_module_level_import_cycles():
    assert import_cycles() == []


def test_every_part_says_what_it_holds_and_may_import():
    for part in ALLOWED:
        if part in ("storage", "ui"):
            continue
        init = ROOT / part.replace(".", "/") / "__init__.py"
        doc = init.read_text()
        assert doc.startswith('"""') and ("May import" in doc or "may import" in doc.lower()), init


def _copy_tree(tmp_path):
    for folder in ("engine", "storage", "cli", "ui"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_planted_upward_import_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    target = root / "engine" / "fp4" / "preview.py"
    target.write_text(target.read_text() + "\n\ndef _planted():\n    from engine.runtime import worker\n")
    found = violations(root)
    assert len(found) == 1 and "engine/fp4/preview.py" in found[0] and "engine.runtime.worker" in found[0]


def test_a_planted_ui_import_in_the_engine_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    target = root / "engine" / "training" / "estimate.py"
    target.write_text("import ui.views\n" + target.read_text())
    assert any("engine/training/estimate.py:1" in v and "ui.views" in v for v in violations(root))


def test_a_planted_cycle_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    target = root / "engine" / "recipe" / "configs.py"
    target.write_text("from engine.recipe import files\n" + target.read_text())
    assert any("engine.recipe.configs" in c and "engine.recipe.files" in c for c in import_cycles(root))
