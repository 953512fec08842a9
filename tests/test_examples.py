"""The scripts in examples/ run as a user runs them (a subprocess, a short run) and
learn: each is seeded, so its test MSE after the given batches is deterministic; the
thresholds sit well below the 0.167 of always predicting 1.0."""
import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script,steps,below", [
    ("optimizer_swap.py", 150, 0.05),   # measured 0.027
    ("fpttlstm_cpu.py", 150, 0.05),     # measured 0.027
    ("custom_cell.py", 80, 0.08),       # measured 0.035
])
def test_example_runs_and_learns(script, steps, below):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--steps", str(steps)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    m = re.search(r"test MSE after (\d+) batches: ([0-9.]+)", p.stdout)
    assert m and int(m.group(1)) == steps, p.stdout
    assert float(m.group(2)) < below, p.stdout
