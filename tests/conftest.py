"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set
before any @triton.jit function is created, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

@pytest.fixture
def fresh_seed(request):
    """A seed drawn fresh for each run, printed on failure (pytest shows it)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
