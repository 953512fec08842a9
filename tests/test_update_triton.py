"""The Triton fused update (kernels/fptt_update.py) against the reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors, as a single
program (the grid barrier is then a no-op); the multi-program grid, its barrier and its
run-to-run determinism are checked by the CUDA tests at the end (skipped without CUDA).
"""
import functools
import math

import pytest
import torch

import fptt_fast
from fptt_fast.kernels import fptt_update as fu

from .utils import scaled_err

TOL = 2e-5
# Sizes multiples of no block, a one-element tensor, a tensor spanning several chunks
# (interpreter chunk 2048), and one parameter whose grad stays None.
SHAPES = [(37, 29), (1,), (2500,), (5, 7, 11), (13,), (300,)]
NONE_GRAD = 4
_ORIG_FUSED = fu.fused_update
SPLIT = 3  # params[:SPLIT] in group 0, the rest in group 1


def _groups(ps, lr):
    # Group 1 differs in lr (and alpha, beta: the kernel must read each tensor's row).
    return [{"params": ps[:SPLIT]},
            {"params": ps[SPLIT:], "lr": lr * 0.3, "alpha": 0.3, "beta": 0.7}]


def make_pair(optimizer, opt_kw, clip, rho, c, lr, device="cpu", shapes=SHAPES,
              nonfinite="raise"):
    base = [torch.randn(s, device=device) for s in shapes]
    pt, pr = [b.clone() for b in base], [b.clone() for b in base]
    kw = dict(lr=lr, optimizer=optimizer, clip=clip, rho=rho, c=c, nonfinite=nonfinite, **opt_kw)
    ot = fptt_fast.FPTT(_groups(pt, lr), backend="triton", **kw)
    orf = fptt_fast.FPTT(_groups(pr, lr), backend="reference", **kw)
    # Start from a random FPTT state (as after some training), the same in both, so the
    # regulariser weighs in the gradient, its norm and the updates from the first step.
    for a, b in zip(pt, pr):
        w_bar = a.detach() + 0.3 * torch.randn_like(a)
        lam = 0.3 * torch.randn_like(a)
        for o, p in ((ot, a), (orf, b)):
            o.state[p]["w_bar"].copy_(w_bar)
            o.state[p]["lam"].copy_(lam)
    return pt, pr, ot, orf


def draw_grads(params, scale=1.0, none_idx=NONE_GRAD):
    return [None if i == none_idx else torch.randn(p.shape, device=p.device) * scale
            for i, p in enumerate(params)]


def set_grads(params, grads, reuse=True):
    """reuse: copy into the existing .grad (stable addresses, as zero_grad(set_to_none=False))."""
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        elif reuse and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g.clone()


def compare(pt, pr, ot, orf, tol=TOL):
    """Every tensor within tol (scaled by max |w|); step counts exactly equal."""
    scale = max(p.abs().max().item() for p in pr)
    worst = 0.0
    for i, (a, b) in enumerate(zip(pt, pr)):
        err = scaled_err(a, b, scale)
        assert err <= tol, f"param {i} ({tuple(a.shape)}): w error {err:.3g}"
        worst = max(worst, err)
        sa, sb = ot.state[a], orf.state[b]
        assert set(sa) == set(sb)
        for name in sa:
            if name == "step":
                assert sa[name].item() == sb[name].item(), f"param {i}: step {sa[name]} vs {sb[name]}"
                continue
            err = scaled_err(sa[name], sb[name], scale)
            assert err <= tol, f"param {i} ({tuple(a.shape)}): {name} error {err:.3g}"
            worst = max(worst, err)
    return worst


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params])


def assert_unchanged(params, opt, snap):
    ws, states = snap
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), ws[i]), f"param {i} changed"
        for k, v in opt.state[p].items():
            assert torch.equal(v, states[i][k]), f"param {i}: {k} changed"


CASES = [
    # optimizer, kwargs, clip, rho, c, lr
    ("sgd", dict(momentum=0.9, nesterov=True), 0.1, 0.5, 2.0, 0.05),             # clip triggers
    ("sgd", dict(weight_decay=0.01), None, 0.0, 1.5, 0.05),                      # plain, no clip
    ("sgd", dict(momentum=0.8, dampening=0.2, weight_decay=0.02), 1e6, 0.5, 0.7, 0.03),
    ("adam", dict(weight_decay=0.01, betas=(0.8, 0.99)), 1e6, 0.5, 2.0, 0.01),   # clip idle
    ("adamw", dict(weight_decay=0.05), 0.1, 0.0, 0.7, 0.01),
]


@pytest.mark.parametrize("optimizer,opt_kw,clip,rho,c,lr", CASES)
def test_matches_reference(fresh_seed, optimizer, opt_kw, clip, rho, c, lr):
    pt, pr, ot, orf = make_pair(optimizer, opt_kw, clip, rho, c, lr)
    snap_none = snapshot(pt[NONE_GRAD:NONE_GRAD + 1], ot)
    builds = None
    for step in range(20):
        grads = draw_grads(pt)
        set_grads(pt, grads)
        set_grads(pr, grads)
        ot.step()
        orf.step()
        compare(pt, pr, ot, orf)
        nt, nr = ot.last_norm.item(), orf.last_norm.item()
        assert math.isfinite(nt) and abs(nt - nr) <= 1e-5 * nr, (nt, nr)
        assert ot._status[1].item() == 0.0
        if clip is not None:  # the case really clips, or really does not
            assert (nr > clip) == (clip < 1.0), (nr, clip)
        if step == 0:
            builds = fu.plan_builds
    # Stable grad addresses: the tables were built once, at the first step.
    assert fu.plan_builds == builds
    # The parameter without a gradient was left alone, as torch does.
    assert_unchanged(pt[NONE_GRAD:NONE_GRAD + 1], ot, snap_none)
    assert ot.state[pt[NONE_GRAD]]["step"].item() == 0
    assert all(ot.state[p]["step"].item() == 20 for i, p in enumerate(pt) if i != NONE_GRAD)
    assert ot.skipped_steps == 0


def test_fresh_grad_tensors_and_groups_with_grad_none(fresh_seed):
    """New .grad tensors every step (tables rebuilt, cache missed), a changing set of
    parameters with a gradient, and an lr changed between steps (hyper row refresh)."""
    pt, pr, ot, orf = make_pair("adam", dict(weight_decay=0.01), 0.5, 0.5, 2.0, 0.01)
    for step in range(6):
        grads = draw_grads(pt, none_idx=step % len(SHAPES))
        set_grads(pt, grads, reuse=False)
        set_grads(pr, grads, reuse=False)
        if step == 3:
            for o in (ot, orf):
                o.param_groups[1]["lr"] = 0.002
        ot.step()
        orf.step()
        compare(pt, pr, ot, orf)


def test_small_chunks_multi_iteration(fresh_seed, monkeypatch):
    """Tiny chunk/block/partial-block sizes: many chunks per tensor, a several-iteration
    walk over the partials, a tensor smaller than a block."""
    monkeypatch.setattr(fu, "_INTERP_CONFIG", (256, 128, 4, 1))
    pt, pr, ot, orf = make_pair("sgd", dict(momentum=0.9), 0.1, 0.5, 2.0, 0.05,
                                shapes=[(600,), (1,), (257,), (13,), (3,)])
    for _ in range(5):
        grads = draw_grads(pt, none_idx=3)
        set_grads(pt, grads)
        set_grads(pr, grads)
        ot.step()
        orf.step()
        compare(pt, pr, ot, orf)
        assert abs(ot.last_norm.item() - orf.last_norm.item()) <= 1e-5 * orf.last_norm.item()
    plan = next(reversed(fu._PLANS.values()))
    assert plan.n_chunks == 3 + 1 + 2 + 1  # 600, 1, 257, 3 (13 has no grad)
    assert plan.config == (256, 128, 4, 1)


@pytest.mark.parametrize("optimizer,opt_kw", [("adam", {}), ("sgd", dict(momentum=0.9))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip(fresh_seed, optimizer, opt_kw, bad):
    pt, pr, ot, orf = make_pair(optimizer, opt_kw, 1.0, 0.5, 2.0, 0.01, nonfinite="skip")
    for step in range(6):
        grads = draw_grads(pt)
        if step == 3:
            grads[2][1234] = bad
            snap = snapshot(pt, ot)
        set_grads(pt, grads)
        set_grads(pr, grads)
        ot.step()
        orf.step()
        if step == 3:
            assert_unchanged(pt, ot, snap)  # bitwise: w, w_bar, lam, optimiser state, step
            assert ot.skipped_steps == 1
            assert ot._status[1].item() == 1.0
            assert not math.isfinite(ot.last_norm.item())
        else:
            assert ot._status[1].item() == 0.0
        compare(pt, pr, ot, orf)
    assert ot.skipped_steps == orf.skipped_steps == 1
    assert all(ot.state[p]["step"].item() == 5 for i, p in enumerate(pt) if i != NONE_GRAD)


def test_nonfinite_raise(fresh_seed):
    pt, pr, ot, orf = make_pair("adamw", dict(weight_decay=0.01), None, 0.0, 1.0, 0.01)
    for step in range(4):
        grads = draw_grads(pt)
        set_grads(pt, grads)
        set_grads(pr, grads)
        if step == 2:
            pt[0].grad[3, 4] = float("nan")
            snap = snapshot(pt, ot)
            with pytest.raises(FloatingPointError):
                ot.step()
            assert_unchanged(pt, ot, snap)
            assert ot.skipped_steps == 1
            continue
        ot.step()
        orf.step()
        compare(pt, pr, ot, orf)


def _run_sequence(seed, optimizer, opt_kw, steps, device="cpu", shapes=SHAPES):
    torch.manual_seed(seed)
    pt, _, ot, _ = make_pair(optimizer, opt_kw, 0.1, 0.5, 2.0, 0.01, device=device, shapes=shapes)
    norms = []
    for _ in range(steps):
        set_grads(pt, draw_grads(pt))
        ot.step()
        norms.append(ot.last_norm.clone())
    return [p.detach().clone() for p in pt], [dict(ot.state[p]) for p in pt], torch.stack(norms)


def _assert_bitwise_equal(run_a, run_b):
    (wa, sa, na), (wb, sb, nb) = run_a, run_b
    assert torch.equal(na, nb)
    for i in range(len(wa)):
        assert torch.equal(wa[i], wb[i]), f"param {i} differs between runs"
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"param {i}: {k} differs between runs"


def test_deterministic_run_to_run(fresh_seed):
    a = _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 4)
    b = _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 4)
    _assert_bitwise_equal(a, b)


def test_fused_update_checks_arguments():
    p = torch.randn(5)
    g = torch.randn(5)
    z = torch.zeros(5)
    hyper = torch.randn(1, 12)
    status = torch.zeros(3)
    step = torch.zeros(1)
    with pytest.raises(ValueError):  # hyper of the wrong width
        fu.fused_update([p], [g], [z.clone()], [z.clone()], [z.clone()], [z.clone()], [step],
                        torch.randn(1, 11), [0], 1, 0.0, status)
    with pytest.raises(ValueError):  # grad of the wrong size
        fu.fused_update([p], [torch.randn(4)], [z.clone()], [z.clone()], [z.clone()],
                        [z.clone()], [step], hyper, [0], 1, 0.0, status)
    with pytest.raises(ValueError):  # group row out of range
        fu.fused_update([p], [g], [z.clone()], [z.clone()], [z.clone()], [z.clone()], [step],
                        hyper, [1], 1, 0.0, status)
    fu.fused_update([], [], [], [], [], [], [], hyper, [], 1, 0.0, status)  # nothing to do
    assert not status.any()


# ------------------------------------------------------------------------------------
# CUDA: the multi-program grid with its barrier (skipped without a GPU)
# ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Big enough for many chunks of 4096: several chunks per program at the default cap.
GPU_SHAPES = [(1100, 1013), (1,), (4097,), (129, 3, 7), (13,), (300,), (512, 512)]


def _with_grid_limit(monkeypatch, limit):
    """FPTT.step calls fu.fused_update at call time: cap its grid for this test."""
    monkeypatch.setattr(fu, "fused_update", functools.partial(_ORIG_FUSED, grid_limit=limit))


@cuda
@pytest.mark.parametrize("grid_limit", [None, 2, 7, 64])
@pytest.mark.parametrize("optimizer,opt_kw,clip", [
    ("adam", dict(weight_decay=0.01), 0.1),
    ("sgd", dict(momentum=0.9, nesterov=True), None),
    ("adamw", dict(weight_decay=0.05), 1e6),
])
def test_gpu_multiprogram_matches_reference(fresh_seed, monkeypatch, grid_limit, optimizer,
                                            opt_kw, clip):
    _with_grid_limit(monkeypatch, grid_limit)
    pt, pr, ot, orf = make_pair(optimizer, opt_kw, clip, 0.5, 2.0, 0.01, device="cuda",
                                shapes=GPU_SHAPES)
    for step in range(20):
        grads = draw_grads(pt)
        set_grads(pt, grads)
        set_grads(pr, grads)
        ot.step()
        orf.step()
        compare(pt, pr, ot, orf)
        nt, nr = ot.last_norm.item(), orf.last_norm.item()
        assert abs(nt - nr) <= 1e-5 * nr, (nt, nr)
        plan = next(reversed(fu._PLANS.values()))
        if step == 0:
            gen0 = plan.barrier[1].item()
        # After every launch nobody is waiting, and the generation moved by one.
        assert plan.barrier[0].item() == 0 and plan.barrier[1].item() == gen0 + step
    expected = min(plan.n_chunks, fu._BLOCKS_PER_SM * fu._sm_count(torch.device("cuda")),
                   grid_limit or plan.n_chunks)
    assert plan.grid == expected and plan.grid > 1


@cuda
@pytest.mark.parametrize("grid_limit", [None, 3])
def test_gpu_deterministic_run_to_run(fresh_seed, monkeypatch, grid_limit):
    _with_grid_limit(monkeypatch, grid_limit)
    a = _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 10, "cuda", GPU_SHAPES)
    b = _run_sequence(fresh_seed, "adam", dict(weight_decay=0.01), 10, "cuda", GPU_SHAPES)
    _assert_bitwise_equal(a, b)


@cuda
def test_gpu_norm_independent_of_grid(fresh_seed, monkeypatch):
    """Per-chunk partials summed in a fixed order: the same bits whatever the grid."""
    runs = []
    for limit in (None, 1, 5):
        _with_grid_limit(monkeypatch, limit)
        runs.append(_run_sequence(fresh_seed, "sgd", dict(momentum=0.9), 5, "cuda", GPU_SHAPES))
    _assert_bitwise_equal(runs[0], runs[1])
    _assert_bitwise_equal(runs[0], runs[2])


@cuda
def test_gpu_nonfinite_skip(fresh_seed):
    pt, pr, ot, orf = make_pair("adam", {}, 1.0, 0.5, 2.0, 0.01, device="cuda",
                                shapes=GPU_SHAPES, nonfinite="skip")
    for step in range(5):
        grads = draw_grads(pt)
        if step == 2:
            grads[0][777, 5] = float("nan")
            snap = snapshot(pt, ot)
        set_grads(pt, grads)
        set_grads(pr, grads)
        ot.step()
        orf.step()
        if step == 2:
            assert_unchanged(pt, ot, snap)
            assert ot.skipped_steps == 1
        compare(pt, pr, ot, orf)


@cuda
def test_gpu_cuda_graph_replay(fresh_seed):
    """opt.step() captured once and replayed: no host work, barrier words reused."""
    pt, pr, ot, orf = make_pair("adam", dict(weight_decay=0.01), 0.1, 0.5, 2.0, 0.01,
                                device="cuda", shapes=GPU_SHAPES, nonfinite="skip")
    grads = draw_grads(pt)
    set_grads(pt, grads)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream: compile, build the plan
        ot.step()
    torch.cuda.current_stream().wait_stream(side)
    set_grads(pr, grads)
    orf.step()
    compare(pt, pr, ot, orf)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ot.step()
    for _ in range(10):
        grads = draw_grads(pt)
        set_grads(pt, grads)
        set_grads(pr, grads)
        graph.replay()
        orf.step()
        torch.cuda.synchronize()
        compare(pt, pr, ot, orf)
