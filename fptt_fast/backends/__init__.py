"""Which backends exist on this machine, and why the others do not.

reference  plain PyTorch (fptt_fast.reference), any device; always available
cpu        C++/OpenMP kernels of fptt_fast._C, CPU tensors
triton     Triton kernels (fptt_fast.kernels), CUDA tensors; on the CPU only
           under TRITON_INTERPRET=1 (slow, for tests)
cuda       C++/CUDA kernels of fptt_fast._C, CUDA tensors
auto       the fastest available for the tensors' device: cuda > triton > reference
           on a GPU, cpu > reference on the CPU

Both choices are made here, in one place: `resolve` for the fused optimiser (FPTT) and
`resolve_segment` for FPTTLSTM's segment step, which also weighs the one-launch kernels'
size limits (and TF32) and returns the optimiser backend that goes with it. `engine(name)`
is the chosen backend as an object (base.py: its interface; one module per backend, each
the only importer of its kernels).
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import layout

BACKENDS = ("reference", "cpu", "triton", "cuda")
# "auto", fastest first, per device type (the reference runs anywhere)
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_ext = None
_ext_error = None


def extension():
    """fptt_fast._C, or None (see extension_error())."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            ext = importlib.import_module("fptt_fast._C")
        except ImportError as e:  # not built: the reference backend still works
            _ext_error = (f"the C++ extension fptt_fast._C is not built ({e}); reinstall with "
                          "torch importable at build time: pip install --no-build-isolation -e .")
        else:  # a stale build would read the wrong hyper-parameters or loss: refuse it
            _ext_error = layout.mismatch(ext)
            _ext = ext if _ext_error is None else None
    return _ext


def extension_error():
    extension()
    return _ext_error


def _triton_reason(device_type: str):
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (slow; meant for tests)"


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run tensors on `device_type`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, these are on {device_type}"
        return extension_error()
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, these are on {device_type}"
        if extension() is None:
            return extension_error()
        if not extension().with_cuda():
            return ("fptt_fast._C was built without CUDA (torch without CUDA or no nvcc at build "
                    "time; FPTT_FAST_CUDA=1 forces it)")
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS + ('auto',)}")


def available(device_type: str = "cpu") -> dict:
    """{backend: None if available else the reason} for tensors on device_type."""
    return {b: unavailable_reason(b, device_type) for b in BACKENDS}


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend to use; raises RuntimeError saying why one is unavailable."""
    if backend == "auto":
        for b in AUTO_ORDER.get(device_type, ("reference",)):
            if unavailable_reason(b, device_type) is None:
                return b
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device_type} tensors: {reason}")
    return backend


# -- the recurrent modules' segment step (FPTTLSTM, FPTTGRU) ------------------------------

def segment_unavailable_reason(backend: str, device_type: str, cell=None) -> str | None:
    """None if the segment step of `cell` (fptt_fast.cells.Cell; None: the LSTM's) can
    run on `backend` for `device_type` tensors, else why not: the backend itself, then the
    segment kernel it needs."""
    if cell is not None and backend not in cell.backends:
        return f"{cell.title} has no {backend} segment kernel (it runs on {', '.join(cell.backends)})"
    reason = unavailable_reason(backend, device_type)
    if reason is not None or backend == "reference":
        return reason
    binding = cell.cpu_binding if cell is not None else "lstm_segment_step_cpu"
    if backend == "cpu" and not hasattr(extension(), binding):
        return (f"fptt_fast._C has no {binding} (built from older sources; rebuild "
                "with pip install --no-build-isolation -e .)")
    if backend == "cuda" and not hasattr(extension(), "lstm_segment_step_cuda"):
        return "fptt_fast._C has no lstm_segment_step_cuda (not in this build)"
    if backend == "triton":
        module = cell.triton_module if cell is not None else "lstm_segment"
        try:
            importlib.import_module(f"fptt_fast.kernels.{module}")
        except Exception as e:  # noqa: BLE001 - any import failure makes it unavailable
            return f"fptt_fast.kernels.{module} is not importable ({e})"
    return None


def segment_size_limit_error(backend: str, I: int, H: int, O: int, tf32: bool = False):
    """Why the one-launch segment kernel of `backend` cannot take these sizes (or TF32),
    or None (the cpu and reference steps have no limit)."""
    if backend == "cuda":
        lim = getattr(extension(), "cuda_lstm_max_hidden", None)
        if lim is not None and H > lim:
            return (f"hidden_size={H} exceeds the CUDA one-launch segment kernel's limit "
                    f"{lim} (csrc/cuda/lstm_segment.cu)")
        if tf32:
            return "the CUDA one-launch segment kernel has no TF32 mode (allow_tf32=True)"
        return None
    if backend != "triton":
        return None
    from ..kernels import lstm_segment as ks
    for name, v, limit in (("hidden_size", H, "MAX_HIDDEN"), ("input_size", I, "MAX_INPUT"),
                           ("output_size", O, "MAX_OUTPUT")):
        lim = getattr(ks, limit, None)
        if lim is not None and v > lim:
            return (f"{name}={v} exceeds the Triton one-launch segment kernel's limit "
                    f"{limit}={lim} (kernels/lstm_segment.py)")
    return None


def resolve_segment(backend: str, device_type: str, sizes=None, tf32=False, cell=None):
    """(segment backend, FPTT optimiser backend) for a recurrent module of `cell` (None:
    the LSTM) with backend=... on `device_type`; sizes = (I, H, O) for the one-launch
    kernels' limits. "auto" takes the first of AUTO_ORDER whose segment step is available
    and takes the sizes (or TF32); the reference segment math comes with the fastest fused
    FPTT update ("auto"). An explicit backend raises: RuntimeError if unavailable,
    ValueError naming a size limit."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
    if backend == "auto":
        for b in AUTO_ORDER.get(device_type, ("reference",)):
            if b == "reference":
                return "reference", "auto"
            if segment_unavailable_reason(b, device_type, cell) is None and (
                    sizes is None or segment_size_limit_error(b, *sizes, tf32=tf32) is None):
                return b, b
        return "reference", "auto"
    if backend == "cpu" and device_type != "cpu":
        raise RuntimeError(f"backend 'cpu' runs CPU tensors, the module is on {device_type}")
    reason = segment_unavailable_reason(backend, device_type, cell)
    if reason is not None:
        if backend == "cpu":
            raise RuntimeError(f"backend 'cpu' is unavailable: {reason}")
        raise RuntimeError(f"backend {backend!r} (one-launch segment step) is unavailable "
                           f"for {device_type} tensors: {reason}")
    err = None if sizes is None else segment_size_limit_error(backend, *sizes, tf32=tf32)
    if err is not None:
        raise ValueError(err)
    return backend, backend


def engine(name: str):
    """A new backend object for `name` (one of BACKENDS)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    mod = importlib.import_module(f".{name}", __name__)
    return getattr(mod, f"{name.capitalize()}Backend")()
