"""What only the Triton fused update (kernels/fptt_update.py) has: its cached launch plan
(built once while the .grad tensors stay the same), its chunk/block configuration, its
argument checks, and on a GPU its grid (capped by grid_limit), the grid barrier and
CUDA-graph replay. Its match with the reference is tested with every backend in
test_update.py (on a GPU there on CUDA tensors, many programs; without one through the
interpreter, one program).
"""
import pytest
import torch

from fptt_fast.kernels import fptt_update as fu
from fptt_fast.layout import HYPER_FIELDS
from fptt_fast.seam import FpttState

from .utils import (NONE_GRAD, SPLIT, assert_bitwise_equal, backend_device, capture_step, compare,
                    draw_grads, make_pair, run_steps, set_grads, triton_compiled, two_groups,
                    with_grid_limit)

gpu = pytest.mark.skipif(not triton_compiled(),
                         reason="needs a CUDA GPU (without one Triton runs in its interpreter)")
# Big enough for many chunks of 4096: several chunks per program at the default cap.
GPU_SHAPES = [(1100, 1013), (1,), (4097,), (129, 3, 7), (13,), (300,), (512, 512)]


def _pair(optimizer, opt_kw, clip, device, shapes, nonfinite="raise"):
    return make_pair("triton", shapes, device=device, split=SPLIT, group1=two_groups(0.01),
                     random_state=True, optimizer=optimizer, clip=clip, rho=0.5, c=2.0, lr=0.01,
                     nonfinite=nonfinite, **opt_kw)


@pytest.mark.skipif(triton_compiled(), reason="the interpreter's configuration (CPU tensors)")
def test_small_chunks_multi_iteration(fresh_seed, monkeypatch):
    """Tiny chunk/block/partial-block sizes: many chunks per tensor, a several-iteration
    walk over the partials, a tensor smaller than a block."""
    monkeypatch.setattr(fu, "_INTERP_CONFIG", (256, 128, 4, 1))
    pa, pb, oa, ob = _pair("sgd", dict(momentum=0.9), 0.1, "cpu", [(600,), (1,), (257,), (13,), (3,)])
    run_steps(pa, pb, oa, ob, 1, none_idx=3)
    builds = fu.plan_builds
    run_steps(pa, pb, oa, ob, 4, none_idx=3)
    assert fu.plan_builds == builds  # stable .grad addresses: tables built at step 1 only
    plan = next(reversed(fu._PLANS.values()))
    assert plan.n_chunks == 3 + 1 + 2 + 1  # 600, 1, 257, 3 (13 has no grad)
    assert plan.config == (256, 128, 4, 1)


def test_fused_update_checks_arguments():
    dev = backend_device("triton")
    p, g = torch.randn(5, device=dev), torch.randn(5, device=dev)
    st = lambda: [torch.randn(5, device=dev)]  # noqa: E731
    hyper = torch.randn(1, len(HYPER_FIELDS), device=dev)
    status = torch.zeros(3, device=dev)
    step = torch.zeros(1, device=dev)
    state = lambda g=g, hyper=hyper, group=0: FpttState(  # noqa: E731
        [p], [g], st(), st(), st(), st(), [step], hyper, [group], optimizer=1, status=status)
    with pytest.raises(ValueError, match=r"state\.hyper"):  # hyper of the wrong width
        fu.fused_update(state(hyper=torch.randn(1, len(HYPER_FIELDS) - 1, device=dev)))
    with pytest.raises(ValueError, match=r"state\.grads\[0\]"):  # grad of the wrong size
        fu.fused_update(state(g=torch.randn(4, device=dev)))
    with pytest.raises(ValueError, match="group index"):  # group row out of range
        fu.fused_update(state(group=1))
    fu.fused_update(FpttState([], [], [], [], [], [], [], hyper, [], optimizer=1,
                              status=status))  # nothing to do
    assert not status.any()


# ------------------------------------------------------------------------------------
# GPU: the multi-program grid with its barrier, capped by grid_limit
# ------------------------------------------------------------------------------------

def _with_grid_limit(monkeypatch, limit):
    """FPTT.step looks fu.fused_update up at call time: cap its grid for this test."""
    with_grid_limit(monkeypatch, fu, "fused_update", limit)


def _run_sequence(seed, optimizer, opt_kw, steps):
    torch.manual_seed(seed)
    pa, _, oa, _ = _pair(optimizer, opt_kw, 0.1, "cuda", GPU_SHAPES)
    norms = []
    for _ in range(steps):
        set_grads(pa, draw_grads(pa, NONE_GRAD))
        oa.step()
        norms.append(oa.last_norm.clone())
    return pa, oa, torch.stack(norms)


def _assert_runs_equal(a, b):
    (pa, oa, na), (pb, ob, nb) = a, b
    assert torch.equal(na, nb), (na, nb)
    assert_bitwise_equal(pa, pb, oa, ob)


@gpu
@pytest.mark.parametrize("grid_limit", [None, 2, 7, 64])
@pytest.mark.parametrize("optimizer,opt_kw,clip", [
    ("adam", dict(weight_decay=0.01), 0.1),
    ("sgd", dict(momentum=0.9, nesterov=True), None),
    ("adamw", dict(weight_decay=0.05), 1e6),
])
def test_gpu_multiprogram_matches_reference(fresh_seed, monkeypatch, grid_limit, optimizer,
                                            opt_kw, clip):
    _with_grid_limit(monkeypatch, grid_limit)
    pa, pb, oa, ob = _pair(optimizer, opt_kw, clip, "cuda", GPU_SHAPES)
    for step in range(20):
        run_steps(pa, pb, oa, ob, 1, none_idx=NONE_GRAD)
        plan = next(reversed(fu._PLANS.values()))
        if step == 0:
            gen0 = plan.barrier[1].item()
            builds = fu.plan_builds
        assert fu.plan_builds == builds  # stable .grad addresses: tables built once
        # After every launch nobody is waiting, and the generation moved by one.
        assert plan.barrier[0].item() == 0 and plan.barrier[1].item() == gen0 + step
    expected = min(plan.n_chunks, fu._BLOCKS_PER_SM * fu._sm_count(torch.device("cuda")),
                   grid_limit or plan.n_chunks)
    assert plan.grid == expected and plan.grid > 1


@gpu
@pytest.mark.parametrize("grid_limit", [None, 3])
def test_gpu_deterministic_run_to_run(fresh_seed, monkeypatch, grid_limit):
    _with_grid_limit(monkeypatch, grid_limit)
    a = _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 10)
    _assert_runs_equal(a, _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 10))


@gpu
def test_gpu_norm_independent_of_grid(fresh_seed, monkeypatch):
    """Per-chunk partials summed in a fixed order: the same bits whatever the grid."""
    runs = []
    for limit in (None, 1, 5):
        _with_grid_limit(monkeypatch, limit)
        runs.append(_run_sequence(fresh_seed, "sgd", dict(momentum=0.9), 5))
    _assert_runs_equal(runs[0], runs[1])
    _assert_runs_equal(runs[0], runs[2])


@gpu
def test_gpu_cuda_graph_replay(fresh_seed):
    """opt.step() captured once and replayed: no host work, barrier words reused."""
    pa, pb, oa, ob = _pair("adam", dict(weight_decay=0.01), 0.1, "cuda", GPU_SHAPES,
                           nonfinite="skip")
    grads = draw_grads(pa, NONE_GRAD)
    set_grads(pa, grads)
    graph = capture_step(oa)  # its warm-up step compiles and builds the plan
    set_grads(pb, grads)
    ob.step()
    compare(pa, pb, oa, ob)
    for _ in range(10):
        grads = draw_grads(pa, NONE_GRAD)
        set_grads(pa, grads)
        set_grads(pb, grads)
        graph.replay()
        ob.step()
        torch.cuda.synchronize()
        compare(pa, pb, oa, ob)

