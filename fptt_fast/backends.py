"""Which backends exist on this machine, and why the others do not.

reference  plain PyTorch (fptt_fast.reference), any device; always available
cpu        C++/OpenMP kernels of fptt_fast._C, CPU tensors
triton     Triton kernels (fptt_fast.kernels), CUDA tensors; on the CPU only
           under TRITON_INTERPRET=1 (slow, for tests)
cuda       C++/CUDA kernels of fptt_fast._C, CUDA tensors
auto       the fastest available for the tensors' device: cuda > triton > reference
           on a GPU, cpu > reference on the CPU
"""
from __future__ import annotations

import importlib
import os

import torch

from . import layout

BACKENDS = ("reference", "cpu", "triton", "cuda")

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
        order = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")
        for b in order:
            if unavailable_reason(b, device_type) is None:
                return b
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device_type} tensors: {reason}")
    return backend
