"""The test-only check bindings (tests/csrc/check_bindings.cpp), built on first use.

They run the C++ argument checks of fptt_fast._C's bindings on a device type given as an
argument, so CPU CI runs the CUDA glue's checks with CPU tensors standing in for CUDA
ones. Built with torch.utils.cpp_extension.load into a folder under the temp directory,
keyed by the sources, and reused while they are unchanged.
"""
import dataclasses
import hashlib
import os
import tempfile
from types import SimpleNamespace

import torch

from fptt_fast import seam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the bindings, and the CPU kernel file that defines the workspace size the checks compare
SOURCES = [os.path.join(ROOT, "tests", "csrc", "check_bindings.cpp"),
           os.path.join(ROOT, "csrc", "cpu", "lstm_segment.cpp")]
INCLUDE = os.path.join(ROOT, "csrc", "include")

# fptt_fast.seam's fields, which the C++ casters (seam_cast.h) read by name
STATE_FIELDS = tuple(f.name for f in dataclasses.fields(seam.FpttState))
SEGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(seam.SegmentIO))
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(seam.SegmentConfig)}

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
