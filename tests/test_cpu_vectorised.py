"""The fused update's element loops vectorise, as GCC reports them with -fopt-info-vec.

A change to the shared update math (fptt_math.h) once left the update loop scalar without
any test noticing (3x slower on the CPU, the same numbers). This compiles
csrc/cpu/fused_update.cpp with setup.py's flags and checks GCC's own report for the two
element loops, in the AVX2 clone (32-byte vectors) and the AVX-512 one (64-byte); no timing.
"""
import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cpu", "fused_update.cpp")
GXX = shutil.which("g++")


def setup_cxx_flags():
    """The `cxx = [...]` flag list of setup.py (the one place the flags are written)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "cxx"):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no `cxx = [...]` flag list")


def loop_lines():
    """Line numbers of the two element loops: chunk_sumsq's lane loop and chunk_update's
    `#pragma omp simd` loop."""
    with open(SOURCE) as f:
        lines = f.read().splitlines()
    sumsq = [i + 1 for i, l in enumerate(lines) if "for (; i + kLanes <= end; i += kLanes)" in l]
    # the line after the pragma: the loop itself
    simd = [i + 2 for i, l in enumerate(lines) if l.strip() == "#pragma omp simd"]
    assert len(sumsq) == 1 and len(simd) == 1, (sumsq, simd)
    return {"chunk_sumsq": sumsq[0], "chunk_update": simd[0]}


@pytest.mark.skipif(GXX is None, reason="no g++ on this machine")
def test_update_loops_vectorise(tmp_path):
    out = subprocess.run(
        [GXX, *setup_cxx_flags(), "-I", os.path.join(ROOT, "csrc", "include"), "-c", SOURCE,
         "-o", str(tmp_path / "fused_update.o"), "-fopt-info-vec-optimized"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = out.stdout + out.stderr
    # GCC names a loop by its `for` line or its body's. The widths it reports per clone:
    # 16 bytes (baseline SSE), 32 (AVX2; also the AVX-512 clone's sum of squares, 8 floats
    # widened to doubles), 64 (the AVX-512 clone's update)
    want = {"chunk_sumsq": {"32"}, "chunk_update": {"32", "64"}}
    for name, line in loop_lines().items():
        widths = set(re.findall(
            rf"fused_update\.cpp:(?:{line}|{line + 1}):\d+: optimized: loop vectorized using "
            rf"(\d+) byte vectors",
            report))
        assert want[name] <= widths, (
            f"{name}'s loop (line {line}) is not vectorised in every wide clone: GCC "
            f"reported widths {sorted(widths)}, wanted {sorted(want[name])}")
