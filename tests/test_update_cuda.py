"""What only the CUDA fused update (csrc/cuda/fused_update.cu, one cooperative launch per
step) has: its grid over many chunks, CUDA-graph capture, the cached slot table (no
host-to-device copy in the steady state) and its binding's checks. Its match with the
reference (per optimiser, groups, non-finite skip/raise, determinism, alignment...) is
tested with every backend in test_update.py.

Skipped, with the reason, where torch has no CUDA device or fptt_fast._C was built
without its CUDA kernels. csrc/cuda/*.cu are still compiled on every machine with nvcc
by tests/test_cuda_sources.py.
"""
import dataclasses
import math

import pytest
import torch

import fptt_fast
from fptt_fast import backends
from fptt_fast.seam import FpttState

from .utils import (NONE_GRAD, SPLIT, assert_bitwise_equal, assert_norm_close, capture_step,
                    compare, draw_grads, make_pair, set_grads, shapes_for, step_pair, two_groups)


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return backends.unavailable_reason("cuda", "cuda")


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CUDA backend unavailable: {_REASON}")

DEV = "cuda"


def _ext():
    return backends.extension()


def _pair(shapes, **kw):
    """cuda and the reference on the same parameters, in two groups."""
    return make_pair("cuda", shapes, device=DEV, split=SPLIT, group1=two_groups(0.01), lr=0.01,
                     **kw)


def _cuda_opt(params, **kw):
    groups = [{"params": params[:SPLIT]}, {"params": params[SPLIT:], **two_groups(0.01)}]
    return fptt_fast.FPTT(groups, backend="cuda", lr=0.01, **kw)


def test_large_tensor_many_blocks(fresh_seed):
    """5M elements: many more chunks than blocks, so each block walks several chunks and
    every block reduces > 1000 partials; the clip triggers."""
    shapes = [(5_000_003,), (1,), (777,), (13,), (4096 * 3,)]
    n_chunks = sum(-(-math.prod(s) // 4096) for i, s in enumerate(shapes) if i != NONE_GRAD)
    grid = _ext().fused_update_cuda_grid_size(n_chunks, 1, torch.cuda.current_device())
    assert 1 < grid < n_chunks, (grid, n_chunks)
    assert _ext().cuda_update_chunk == 4096
    pa, pb, oa, ob = _pair(shapes, optimizer="adam", weight_decay=0.01, clip=1.0, rho=0.5, c=2.0)
    for _ in range(5):
        step_pair(pa, pb, oa, ob, draw_grads(pa, NONE_GRAD))
        assert ob.last_norm.item() > 1.0
        assert_norm_close(oa, ob)
        compare(pa, pb, oa, ob)


@pytest.mark.parametrize("optimizer,opt_kw", [("adam", dict(weight_decay=0.01)),
                                              ("sgd", dict(momentum=0.9, nesterov=True))])
def test_cuda_graph_capture_matches_eager(fresh_seed, optimizer, opt_kw):
    """opt.step() captured in a CUDA graph and replayed gives bitwise the eager steps."""
    shapes = shapes_for(DEV) + [(70_001,)]
    kw = dict(optimizer=optimizer, clip=0.5, rho=0.5, c=2.0, nonfinite="skip", **opt_kw)
    base = [torch.randn(s, device=DEV) for s in shapes]
    pe, pg = [b.clone() for b in base], [b.clone() for b in base]
    oe, og = _cuda_opt(pe, **kw), _cuda_opt(pg, **kw)
    seq = [draw_grads(pe, NONE_GRAD) for _ in range(10)]
    set_grads(pe, seq[0])
    set_grads(pg, seq[0])
    graph = capture_step(og)  # its warm-up step is step 0 (it also builds the cached table)
    oe.step()
    for k in range(1, len(seq)):
        set_grads(pe, seq[k])
        set_grads(pg, seq[k])  # copies into the static .grad tensors the graph reads
        graph.replay()
        oe.step()
    # A skipped step inside the graph too.
    bad = [None if g is None else g.clone() for g in seq[-1]]
    bad[0][0, 0] = float("nan")
    set_grads(pe, bad)
    set_grads(pg, bad)
    graph.replay()
    oe.step()
    torch.cuda.synchronize()
    assert og.skipped_steps == oe.skipped_steps == 1
    assert_bitwise_equal(pe, pg, oe, og)
    assert all(og.state[p]["step"].item() == len(seq) for i, p in enumerate(pg) if i != NONE_GRAD)


def test_steady_state_no_host_to_device_copy(fresh_seed):
    """After the first step the slot table is cached: a step launches the kernel only."""
    pa, _, oa, _ = _pair(shapes_for(DEV), optimizer="adam", clip=1.0, rho=0.5, c=2.0)
    set_grads(pa, draw_grads(pa, NONE_GRAD))
    oa.step()
    oa.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        oa.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    if not any("fused_update_kernel" in n for n in names):
        pytest.skip("the profiler recorded no CUDA kernel here (no CUPTI?)")
    assert not any("Memcpy HtoD" in n for n in names), [n for n in names if "Memcpy" in n]


def test_status_checks():
    p = torch.randn(10, device=DEV)
    g = torch.randn(10, device=DEV)
    z = lambda: torch.zeros(10, device=DEV)  # noqa: E731
    hyper = torch.zeros(1, len(fptt_fast.optim.HYPER_FIELDS), device=DEV)
    step = torch.zeros(1, device=DEV)
    state = FpttState([p], [g], [z()], [z()], [z()], [z()], [step], hyper, [0], optimizer=1,
                      clip=0.0, status=torch.zeros(3, device=DEV))
    for bad in (torch.zeros(3), torch.zeros(4, device=DEV), torch.zeros(3, device=DEV, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"state\.status"):
            _ext().fused_update_cuda(dataclasses.replace(state, status=bad))
    with pytest.raises(RuntimeError, match=r"state\.params\[0\]"):  # a CPU tensor in the lists
        _ext().fused_update_cuda(dataclasses.replace(state, params=[p.cpu()]))
