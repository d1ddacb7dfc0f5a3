"""Every benchmark script says, in its --help, what it measures and where the result goes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.runtime.workspace import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_says_what_it_measures_and_where_the_result_goes(script):
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "usage:" in text
    result = text[text.index("Result:"):] if "Result:" in text else ""
    assert result, f"{script.name} --help does not say where its result goes (a 'Result:' line)"


def test_device_script_lists_its_steps_and_refuses_unknown_ones():
    listed = subprocess.run(["bash", "bench/device.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 2 and "qat-step" in listed.stdout and "gpu-tests" in listed.stdout
    bad = subprocess.run(["bash", "bench/device.sh", "no-such-step"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=30, env={"OUT": "/tmp/device-sh-test", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "unknown step 'no-such-step'" in bad.stderr
