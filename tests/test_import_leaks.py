"""Importing modelopt must not pin the importer's locals (engine/fp4/import_leaks.py says why it did).

Each check runs in a fresh interpreter: modelopt's first import in the process is the one that matters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.runtime.workspace import REPO_ROOT

CHECK = """
import gc, sys, weakref
import torch
from engine.fp4 import torch_backend, model_io, modelopt_glue

def import_while_holding(first_import):
    tensor = torch.zeros(1 << 20)  # stands for the model a stage holds when it first touches modelopt
    first_import()
    return weakref.ref(tensor)

ref = import_while_holding({call})
gc.collect()
kept = [v for n, m in list(sys.modules.items()) if n.startswith("pulp") and m is not None
        for c in vars(m).values() if isinstance(c, type) for v in vars(c).values() if isinstance(v, BaseException)]
print("pulp keeps", len(kept), "exceptions;", "alive" if ref() is not None else "freed")
"""


@pytest.mark.parametrize("call", ["modelopt_glue.mtq", "model_io.enable_modelopt_checkpointing"])  # the two usual first imports
def test_the_first_modelopt_import_frees_the_callers_locals(call):
    out = subprocess.run([sys.executable, "-c", CHECK.format(call=call)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    kept = int(line.split()[2])
    assert kept > 0, line  # pulp still keeps its import errors: otherwise this test checks nothing
    assert line.endswith("freed"), line
