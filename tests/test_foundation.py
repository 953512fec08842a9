"""Foundation pieces: the Add task's data, and the package without its extension."""
import os

import pytest
import torch

import fptt_fast
from fptt_fast import backends, tasks


@pytest.mark.parametrize("T", [2, 7, 50])
def test_add_task_data(T, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x, y = tasks.add_task(T, 64, generator=gen)
    assert x.shape == (T, 64, 2) and y.shape == (64, 1)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    half = T // 2
    assert torch.equal(markers[:half].sum(0), torch.ones(64))   # one marker in the first half
    assert torch.equal(markers[half:].sum(0), torch.ones(64))   # one in the second
    assert torch.allclose((values * markers).sum(0), y[:, 0])
    # seeded: the same generator state gives the same batch
    x2, y2 = tasks.add_task(T, 64, generator=torch.Generator().manual_seed(fresh_seed))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # predicting 1.0 gives MSE ~ 1/6 (the "unsolved" level of docs/ALGORITHM.md), on a large batch
    _, yb = tasks.add_task(T, 20000, generator=gen)
    assert abs(((yb - 1.0) ** 2).mean().item() - 1 / 6) < 0.01


def test_add_task_rejects_bad_sizes():
    with pytest.raises(ValueError):
        tasks.add_task(1, 4)
    with pytest.raises(ValueError):
        tasks.add_task(10, 0)


def test_without_extension_reference_works_and_cpu_says_why(monkeypatch, fresh_seed):
    """If fptt_fast._C is missing, the reference backend still works and asking for
    the cpu or cuda backend says exactly why it is unavailable."""
    monkeypatch.setattr(backends, "_ext", None)
    monkeypatch.setattr(backends, "_ext_error", "the C++ extension fptt_fast._C is not built (test)")
    assert backends.available("cpu")["cpu"].startswith("the C++ extension")
    assert backends.resolve("auto", "cpu") == "reference"
    p = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not built"):
        fptt_fast.FPTT([p], backend="cpu")
    opt = fptt_fast.FPTT([p], backend="auto")
    assert opt.backend == "reference"
    p.grad = torch.randn(5)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_gpu_harness_runs_every_test_file():
    """benchmarks/gpu_check.sh runs the suite in two named lists (GPU_TESTS, HOST_TESTS):
    a test file missing from both would never run on a GPU."""
    import glob
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "gpu_check.sh")) as f:
        script = f.read()
    listed = []
    for name in ("GPU_TESTS", "HOST_TESTS"):
        m = re.search(name + r'="([^"]*)"', script)
        assert m, f"{name} not found in gpu_check.sh"
        listed += m.group(1).split()
    files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "tests", "test_*.py")))
    assert sorted(listed) == files
