"""The CUDA fused update (csrc/cuda/fused_update.cu, one cooperative launch per step)
against the reference, on a GPU.

Skipped, with the reason, where torch has no CUDA device or fptt_fast._C was built
without its CUDA kernels. csrc/cuda/*.cu are still compiled on every machine with nvcc
by tests/test_cuda_sources.py.
"""
import math

import pytest
import torch

import fptt_fast
from fptt_fast import backends

from .utils import scaled_err


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return backends.unavailable_reason("cuda", "cuda")


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CUDA backend unavailable: {_REASON}")

TOL = 2e-5
DEV = "cuda"
# Sizes multiples of no block or chunk (4096), a one-element tensor (it shifts every later
# state view off 16-byte alignment: the scalar path), tensors spanning several chunks,
# and one parameter whose grad stays None.
SHAPES = [(37, 29), (1,), (9000,), (5, 7, 11), (13,), (4097,), (300,)]
NONE_GRAD = 4
SPLIT = 3  # params[:SPLIT] in group 0, the rest in group 1


def _ext():
    return backends.extension()


def _groups(ps, lr):
    # Group 1 differs in lr (and alpha, beta: the kernel must read each tensor's row).
    return [{"params": ps[:SPLIT]},
            {"params": ps[SPLIT:], "lr": lr * 0.3, "alpha": 0.3, "beta": 0.7}]


def make_pair(optimizer, opt_kw, clip, rho, c, lr, shapes=SHAPES, nonfinite="raise"):
    """The same parameters under the cuda backend (a) and the reference (b)."""
    base = [torch.randn(s, device=DEV) for s in shapes]
    pa, pb = [b.clone() for b in base], [b.clone() for b in base]
    kw = dict(lr=lr, optimizer=optimizer, clip=clip, rho=rho, c=c, nonfinite=nonfinite, **opt_kw)
    oa = fptt_fast.FPTT(_groups(pa, lr), backend="cuda", **kw)
    ob = fptt_fast.FPTT(_groups(pb, lr), backend="reference", **kw)
    return pa, pb, oa, ob


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


def compare(pa, pb, oa, ob, tol=TOL):
    """Every tensor within tol (scaled by max |w|); step counts exactly equal."""
    scale = max(p.abs().max().item() for p in pb)
    for i, (a, b) in enumerate(zip(pa, pb)):
        err = scaled_err(a, b, scale)
        assert err <= tol, f"param {i} ({tuple(a.shape)}): w error {err:.3g}"
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb)
        for name in sa:
            if name == "step":
                assert sa[name].item() == sb[name].item(), f"param {i}: step {sa[name]} vs {sb[name]}"
                continue
            err = scaled_err(sa[name], sb[name], scale)
            assert err <= tol, f"param {i} ({tuple(a.shape)}): {name} error {err:.3g}"


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params])


def assert_unchanged(params, opt, snap):
    ws, states = snap
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), ws[i]), f"param {i} changed"
        for k, v in opt.state[p].items():
            assert torch.equal(v, states[i][k]), f"param {i}: {k} changed"


def assert_bitwise_equal(pa, pb, oa, ob):
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i} differs"
        for name in oa.state[a]:
            assert torch.equal(oa.state[a][name], ob.state[b][name]), f"param {i}: {name} differs"
    # status [norm, last skipped, skipped count]; the norm of a skipped step is NaN/inf
    torch.testing.assert_close(oa._status, ob._status, rtol=0, atol=0, equal_nan=True)


CASES = [
    # optimizer, kwargs, clip, rho, c, lr
    ("sgd", dict(momentum=0.9, nesterov=True), 0.1, 0.5, 2.0, 0.05),             # clip triggers
    ("sgd", dict(weight_decay=0.01), None, 0.0, 1.5, 0.05),                      # plain, no clip
    ("sgd", dict(momentum=0.8, dampening=0.2, weight_decay=0.02), 1e6, 0.5, 0.7, 0.03),
    ("adam", dict(weight_decay=0.01), 1e6, 0.5, 2.0, 0.01),                      # clip idle
    ("adam", dict(betas=(0.8, 0.99)), 0.1, 0.0, 2.0, 0.01),
    ("adamw", dict(weight_decay=0.05), 0.1, 0.0, 0.7, 0.01),
    ("adamw", dict(weight_decay=0.1), None, 0.5, 1.0, 0.02),
]


@pytest.mark.parametrize("optimizer,opt_kw,clip,rho,c,lr", CASES)
def test_matches_reference(fresh_seed, optimizer, opt_kw, clip, rho, c, lr):
    pa, pb, oa, ob = make_pair(optimizer, opt_kw, clip, rho, c, lr)
    assert oa.backend == "cuda" and ob.backend == "reference"
    w_none = pa[NONE_GRAD].detach().clone()
    for _ in range(24):
        grads = draw_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        oa.step()
        ob.step()
        compare(pa, pb, oa, ob)
        na, nb = oa.last_norm.item(), ob.last_norm.item()
        assert math.isfinite(na) and abs(na - nb) <= 1e-5 * nb, (na, nb)
        assert oa._status[1].item() == 0.0
        if clip is not None:  # the case really clips, or really does not
            assert (nb > clip) == (clip < 1.0), (nb, clip)
    # The parameter without a gradient was left alone, as torch does.
    assert torch.equal(pa[NONE_GRAD].detach(), w_none)
    st = oa.state[pa[NONE_GRAD]]
    assert st["step"].item() == 0 and torch.equal(st["w_bar"], w_none) and not st["lam"].any()
    assert all(oa.state[p]["step"].item() == 24 for i, p in enumerate(pa) if i != NONE_GRAD)
    assert oa.skipped_steps == 0


def test_fresh_grad_tensors_and_changing_sets(fresh_seed):
    """New .grad tensors every step (the cached slot table misses), a changing set of
    parameters with a gradient, and an lr changed between steps (new hyper table)."""
    pa, pb, oa, ob = make_pair("adam", dict(weight_decay=0.01), 0.5, 0.5, 2.0, 0.01)
    for step in range(12):
        grads = draw_grads(pa, none_idx=step % len(SHAPES))
        set_grads(pa, grads, reuse=False)
        set_grads(pb, grads, reuse=False)
        if step == 5:
            for o in (oa, ob):
                o.param_groups[1]["lr"] = 0.002
        oa.step()
        ob.step()
        compare(pa, pb, oa, ob)


def _single_group_pair(pa, optimizer="adam", steps=20):
    pb = [q.clone() for q in pa]
    kw = dict(lr=0.01, optimizer=optimizer, clip=0.3, rho=0.5, c=2.0, momentum=0.0)
    oa = fptt_fast.FPTT(pa, backend="cuda", **kw)
    ob = fptt_fast.FPTT(pb, backend="reference", **kw)
    for _ in range(steps):
        grads = [torch.randn(q.shape, device=DEV) for q in pa]
        set_grads(pa, grads)
        set_grads(pb, grads)
        oa.step()
        ob.step()
        compare(pa, pb, oa, ob)


def test_misaligned_parameter(fresh_seed):
    """A parameter starting 4 bytes past a 16-byte boundary: the float4 path is off for
    it, the scalar path must give the same results."""
    big = torch.randn(5001, device=DEV)
    pa = [big[1:], torch.randn(3, device=DEV), torch.randn(4096 + 5, device=DEV)]
    assert pa[0].data_ptr() % 16 == 4 and pa[0].is_contiguous()
    _single_group_pair(pa)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_single_one_element_tensor(fresh_seed, optimizer):
    """One slot, one chunk, one block (the grid barrier with a grid of one)."""
    _single_group_pair([torch.randn(1, device=DEV)], optimizer)


@pytest.mark.parametrize("optimizer,opt_kw", [("adam", {}), ("sgd", dict(momentum=0.9))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip(fresh_seed, optimizer, opt_kw, bad):
    pa, pb, oa, ob = make_pair(optimizer, opt_kw, 1.0, 0.5, 2.0, 0.01, nonfinite="skip")
    for step in range(6):
        grads = draw_grads(pa)
        if step == 3:
            grads[2][1234] = bad
            snap = snapshot(pa, oa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        oa.step()
        ob.step()
        if step == 3:
            assert_unchanged(pa, oa, snap)  # bitwise: w, w_bar, lam, optimiser state, step
            assert oa.skipped_steps == 1
            assert oa._status[1].item() == 1.0
            assert not math.isfinite(oa.last_norm.item())
        else:
            assert oa._status[1].item() == 0.0
        compare(pa, pb, oa, ob)
    assert oa.skipped_steps == ob.skipped_steps == 1
    assert all(oa.state[p]["step"].item() == 5 for i, p in enumerate(pa) if i != NONE_GRAD)


def test_nonfinite_raise(fresh_seed):
    pa, pb, oa, ob = make_pair("adamw", dict(weight_decay=0.01), None, 0.0, 1.0, 0.01)
    for step in range(4):
        grads = draw_grads(pa)
        if step == 2:
            grads[0][3, 4] = float("nan")
            snap = snapshot(pa, oa)
            set_grads(pa, grads)
            oa.step()  # queued; raises once the GPU has finished
            with pytest.raises(FloatingPointError):
                oa.check_finite()
            assert_unchanged(pa, oa, snap)
            continue
        set_grads(pa, grads)
        set_grads(pb, grads)
        oa.step()
        ob.step()
        oa.check_finite()
        compare(pa, pb, oa, ob)


def _run(shapes, n_steps, seed, optimizer="adam", clip=0.5):
    torch.manual_seed(seed)
    params = [torch.randn(s, device=DEV) for s in shapes]
    opt = fptt_fast.FPTT(_groups(params, 0.01), lr=0.01, optimizer=optimizer, clip=clip, rho=0.5,
                         c=2.0, backend="cuda", nonfinite="skip", weight_decay=0.01)
    norms = []
    for _ in range(n_steps):
        set_grads(params, draw_grads(params))
        opt.step()
        norms.append(opt.last_norm.clone())
    torch.cuda.synchronize()
    return params, opt, torch.stack(norms)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bitwise_deterministic(fresh_seed, optimizer):
    """Two runs of the same steps give bitwise-equal results (the norm's partial sums are
    summed in a fixed order by every block), also with many blocks."""
    shapes = SHAPES + [(3_000_001,)]
    pa, oa, na = _run(shapes, 6, fresh_seed, optimizer)
    pb, ob, nb = _run(shapes, 6, fresh_seed, optimizer)
    assert torch.equal(na, nb), (na, nb)
    assert_bitwise_equal(pa, pb, oa, ob)


def test_large_tensor_many_blocks(fresh_seed):
    """5M elements: many more chunks than blocks, so each block walks several chunks and
    every block reduces > 1000 partials; the clip triggers."""
    shapes = [(5_000_003,), (1,), (777,), (13,), (4096 * 3,)]
    n_chunks = sum(-(-math.prod(s) // 4096) for i, s in enumerate(shapes) if i != NONE_GRAD)
    grid = _ext().fused_update_cuda_grid_size(n_chunks, 1, torch.cuda.current_device())
    assert 1 < grid < n_chunks, (grid, n_chunks)
    assert _ext().cuda_update_chunk == 4096
    pa, pb, oa, ob = make_pair("adam", dict(weight_decay=0.01), 1.0, 0.5, 2.0, 0.01,
                               shapes=shapes)
    for _ in range(5):
        grads = draw_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        oa.step()
        ob.step()
        assert ob.last_norm.item() > 1.0
        assert abs(oa.last_norm.item() - ob.last_norm.item()) <= 1e-5 * ob.last_norm.item()
        compare(pa, pb, oa, ob)


@pytest.mark.parametrize("optimizer,opt_kw", [("adam", dict(weight_decay=0.01)),
                                              ("sgd", dict(momentum=0.9, nesterov=True))])
def test_cuda_graph_capture_matches_eager(fresh_seed, optimizer, opt_kw):
    """opt.step() captured in a CUDA graph and replayed gives bitwise the eager steps."""
    shapes = SHAPES + [(70_001,)]
    base = [torch.randn(s, device=DEV) for s in shapes]
    pe, pg = [b.clone() for b in base], [b.clone() for b in base]
    kw = dict(lr=0.01, optimizer=optimizer, clip=0.5, rho=0.5, c=2.0, nonfinite="skip", **opt_kw)
    oe = fptt_fast.FPTT(_groups(pe, 0.01), backend="cuda", **kw)
    og = fptt_fast.FPTT(_groups(pg, 0.01), backend="cuda", **kw)
    seq = [draw_grads(pe) for _ in range(10)]
    set_grads(pe, seq[0])
    set_grads(pg, seq[0])
    # Warm-up step on a side stream (torch's recipe); it also builds the cached table.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        og.step()
    torch.cuda.current_stream().wait_stream(side)
    oe.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
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
    pa, _, oa, _ = make_pair("adam", {}, 1.0, 0.5, 2.0, 0.01)
    set_grads(pa, draw_grads(pa))
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
    args = ([p], [g], [z()], [z()], [z()], [z()], [step], hyper, [0], 1, 0.0)
    for bad in (torch.zeros(3), torch.zeros(4, device=DEV), torch.zeros(3, device=DEV, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="status"):
            _ext().fused_update_cuda(*args, bad)
    with pytest.raises(RuntimeError):  # a CPU tensor in the lists
        _ext().fused_update_cuda([p.cpu()], *args[1:], torch.zeros(3, device=DEV))
