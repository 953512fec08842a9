"""The CUDA backend's kernel choice (FPTTLSTM(cuda_kernel=...)) and the persistent
weight-stationary kernel (csrc/cuda/lstm_persistent.cu) against the reference backend.

The kernel tests need a GPU with thread-block clusters (sm_90+) and skip without one;
the argument checks run everywhere. benchmarks/persistent_check.py runs the same
comparisons with timings in the GPU harness.
"""
import pytest
import torch

import fptt_fast
from fptt_fast import backends

CUDA = torch.cuda.is_available() and backends.unavailable_reason("cuda", "cuda") is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA extension")
TOL = 1e-4  # relative to max |w|, through matmuls and reductions (DEVELOPERS.md)


def test_cuda_kernel_argument_is_checked():
    with pytest.raises(ValueError, match="cuda_kernel"):
        fptt_fast.FPTTLSTM(2, 4, 1, cuda_kernel="fast", backend="reference")
    m = fptt_fast.FPTTLSTM(2, 4, 1, backend="reference")
    assert m.cuda_kernel == "auto" and m.last_kernel is None


def make(I, H, O, loss, per_step, opt, backend, kernel="auto", seed=0):
    torch.manual_seed(seed)
    kw = dict(lr=1e-2 if opt == "sgd" else 1e-3, optimizer=opt, clip=1.0, loss=loss,
              per_step=per_step, backend=backend, device="cuda")
    if opt == "sgd":
        kw["momentum"] = 0.9
    if backend == "cuda":
        kw["cuda_kernel"] = kernel
    return fptt_fast.FPTTLSTM(I, H, O, **kw)


def batches(T, B, I, O, loss, per_step, n, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lead = (T, B) if per_step else (B,)
    out = []
    for _ in range(n):
        x = torch.randn(T, B, I, device="cuda", generator=g)
        y = (torch.randn(*lead, O, device="cuda", generator=g) if loss == "mse"
             else torch.randint(0, O, lead, device="cuda", generator=g))
        out.append((x, y))
    return out


def fptt_state(m):
    out = {}
    for i, p in enumerate(m.fptt_parameters()):
        out[f"w{i}"] = p.detach().clone()
        for k, v in m.optimizer.state[p].items():
            if torch.is_tensor(v) and v.dtype.is_floating_point:
                out[f"{k}{i}"] = v.detach().clone()
    return out


def train(m, data, K):
    losses = [m.train_sequence(x, y, K) for x, y in data]
    torch.cuda.synchronize()
    return torch.cat(losses)


# (T, K, B, I, H, O, loss, per_step, optimizer, batches): H from 1 to the limit 128,
# both row layouts (8 and 16 rows per cluster), MSE and CE, terminal and per-step
GRID = [
    (20, 10, 5, 2, 16, 1, "mse", False, "adam", 2),
    (30, 10, 7, 3, 33, 4, "ce", False, "sgd", 2),
    (12, 4, 9, 5, 7, 3, "mse", True, "adamw", 5),
    (40, 10, 128, 2, 128, 1, "mse", False, "sgd", 2),
    (21, 7, 33, 32, 64, 10, "ce", True, "sgd", 3),
    (10, 10, 200, 1, 1, 32, "ce", False, "adam", 2),
]


@needs_cuda
@pytest.mark.parametrize("case", GRID, ids=[f"H{c[4]}-B{c[2]}-{c[6]}{'-step' if c[7] else ''}-{c[8]}" for c in GRID])
def test_persistent_matches_reference_and_is_deterministic(case):
    T, K, B, I, H, O, loss, per_step, opt, n = case
    data = batches(T, B, I, O, loss, per_step, n, seed=H * 1000 + B)
    ref = make(I, H, O, loss, per_step, opt, "reference")
    runs = [make(I, H, O, loss, per_step, opt, "cuda", "persistent") for _ in range(2)]
    # poison the gradient buffers: the kernel must write every element
    for m in runs:
        m._grads = [torch.full_like(p, float("nan")) for p in m.fptt_parameters()]
    l_ref = train(ref, data, K)
    l_runs = [train(m, data, K) for m in runs]
    assert all(m.last_kernel == "persistent" for m in runs)
    s_ref, s0, s1 = fptt_state(ref), fptt_state(runs[0]), fptt_state(runs[1])
    scale = max(float(v.abs().max()) for k, v in s_ref.items() if k.startswith("w"))
    for k in s_ref:
        err = float((s0[k] - s_ref[k]).abs().max()) / scale
        assert err <= TOL, (k, err)
        assert torch.equal(s0[k], s1[k]), f"{k} differs between two identical runs"
    assert torch.allclose(l_runs[0], l_ref, rtol=TOL, atol=0)
    assert torch.equal(l_runs[0], l_runs[1])


@needs_cuda
def test_auto_falls_back_to_the_general_kernel_and_persistent_refuses():
    m = make(2, 160, 1, "mse", False, "adam", "cuda")  # H > 128: beyond the persistent kernel
    x, y = batches(4, 3, 2, 1, "mse", False, 1, seed=1)[0]
    m.train_sequence(x, y, 2)
    assert m.last_kernel == "general"
    p = make(2, 160, 1, "mse", False, "adam", "cuda", "persistent")
    with pytest.raises(RuntimeError, match="persistent kernel cannot take"):
        p.train_sequence(x, y, 2)


@needs_cuda
def test_persistent_segment_in_a_cuda_graph_replays_bitwise():
    """train_segment captured in a CUDA graph gives the same bits as eager calls."""
    data = batches(5, 16, 2, 1, "mse", False, 1, seed=3)[0]
    eager = make(2, 32, 1, "mse", False, "adam", "cuda", "persistent")
    graphed = make(2, 32, 1, "mse", False, "adam", "cuda", "persistent")
    for m in (eager, graphed):
        m.optimizer.nonfinite = "skip"
    x, y = data
    state = (torch.zeros(16, 32, device="cuda"), torch.zeros(16, 32, device="cuda"))
    for _ in range(4):
        eager.train_segment(x, y, state=state)
    graphed.train_segment(x, y, state=state)  # eager warm-up builds the tables
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        graphed.train_segment(x, y, state=state)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = fptt_state(eager), fptt_state(graphed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
