"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in its interpreter on CPU tensors: TRITON_INTERPRET must
be set before any @triton.jit function is created, so it is set here, first, and only
then. With a GPU it is left alone, so Triton compiles and its tests run on CUDA tensors
(tests/utils.py: backend_device says where each backend's tests run).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    # the slowest tests (a full nvcc compile, the binding fuzz) carry timeout(...) marks
    # for pytest-timeout, which the GPU harness runs with a short per-test default; CI may
    # not have the plugin: declare the mark so it is known either way
    config.addinivalue_line("markers", "timeout(seconds): per-test limit under pytest-timeout")


def pytest_report_header(config):
    from .utils import device_of, triton_compiled
    triton = "compiled" if triton_compiled() else "interpreter"
    return (f"fptt_fast backends: cpu on cpu, triton on {device_of('triton')} ({triton}), "
            f"cuda {'on cuda' if torch.cuda.is_available() else 'skipped (no GPU)'}")


def pytest_collection_finish(session):
    """Start test_lstm_triton.py's ahead-of-time sm_90 compile (a subprocess) as soon as
    the tests are chosen, if it is among them, so that it runs beside the others."""
    for item in session.items:
        if item.name == "test_gpu_path_compiles_for_sm90":
            item.module.start_sm90_compile()


@pytest.fixture
def fresh_seed(request):
    """A seed drawn fresh for each run, printed on failure (pytest shows it)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
