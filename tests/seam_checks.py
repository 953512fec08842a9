"""The test-only check bindings (tests/csrc/check_bindings.cpp), built on first use.

They run the C++ argument checks of fptt_fast._C's bindings on a device type given as an
argument, so CPU CI runs the CUDA glue's checks with CPU tensors standing in for CUDA
ones. Built with torch.utils.cpp_extension.load into a folder under the temp directory,
keyed by the sources, and reused while they are unchanged.
"""
import hashlib
import os
import tempfile
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the bindings, and the CPU kernel file that defines the workspace size the checks compare
SOURCES = [os.path.join(ROOT, "tests", "csrc", "check_bindings.cpp"),
           os.path.join(ROOT, "csrc", "cpu", "lstm_segment.cpp")]
INCLUDE = os.path.join(ROOT, "csrc", "include")

STATE_FIELDS = ("params", "grads", "w_bar", "lam", "exp_avg", "exp_avg_sq", "step", "hyper",
                "group_of", "optimizer", "clip", "status")
SEGMENT_FIELDS = ("x", "target", "h0", "c0", "h_out", "c_out", "losses")
CONFIG_DEFAULTS = dict(weight=1.0, loss=0, per_step=False, update=True, n_segs=1, ramp=False,
                       tf32=False, kernel=0, builtin_gemm=False)

_ext = None


def _key() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for folder, _, files in sorted(os.walk(INCLUDE)):
        for f in sorted(files):
            with open(os.path.join(folder, f), "rb") as fh:
                h.update(fh.read())
    for src in SOURCES:
        with open(src, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def check_ext():
    """The built module (fptt_fast_check_bindings)."""
    global _ext
    if _ext is None:
        from torch.utils.cpp_extension import load
        build = os.path.join(tempfile.gettempdir(), "fptt_fast_check_bindings", _key())
        os.makedirs(build, exist_ok=True)
        _ext = load("fptt_fast_check_bindings", SOURCES, extra_include_paths=[INCLUDE],
                    extra_cflags=["-O0", "-std=c++17"], build_directory=build, verbose=False)
    return _ext


def twins(args: dict):
    """(state, segment, config) namespaces from a flat dict of binding fields (the names of
    fptt_fast.seam's dataclasses); a field missing from `args` is None (config: its
    default). Namespaces, not the dataclasses: tests hand the bindings wrong types too."""
    state = SimpleNamespace(**{k: args.get(k) for k in STATE_FIELDS})
    segment = SimpleNamespace(**{k: args.get(k) for k in SEGMENT_FIELDS})
    config = SimpleNamespace(**{k: args.get(k, d) for k, d in CONFIG_DEFAULTS.items()})
    return state, segment, config
