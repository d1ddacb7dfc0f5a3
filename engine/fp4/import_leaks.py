"""Free what importing modelopt pins: the caller's frames, and with them whatever model the caller holds.

modelopt imports pulp (its searcher's LP solver). At import, pulp probes for optional solvers and keeps each failure
as a class attribute (`COPT_DLL.err`, `CPLEX_PY.err`, ...). An exception keeps its traceback, the traceback its
frames, and each frame the one that called it: every frame on the stack during the first import of modelopt, up to
the caller's, stays alive for the life of the process, locals included. On CPU a tiny model quantized inside a
function outlived the function (tests/test_import_leaks.py); the H100 QAT benchmark's same-process runs showed the
same thing at scale (the first quantized path's 5.2 GiB model still allocated during the next path; not re-run). No pulp or modelopt setting avoids it, so we drop those
tracebacks (the messages, which pulp shows when such a solver is asked for, stay).
"""

from __future__ import annotations

import sys


def drop_pulp_import_tracebacks() -> int:
    """Detach the tracebacks of the exceptions pulp's modules keep on their classes; returns how many."""
    dropped = 0
    for name, module in list(sys.modules.items()):
        if not (name == "pulp" or name.startswith("pulp.")) or module is None:
            continue
        for value in list(vars(module).values()):
            if not isinstance(value, type):
                continue
            for attr in list(vars(value).values()):
                if isinstance(attr, BaseException) and attr.__traceback__ is not None:
                    attr.__traceback__ = None
                    dropped += 1
    return dropped
