"""Every fused backend of the FPTT optimiser against the reference backend.

cpu runs everywhere; triton runs on CPU tensors through Triton's interpreter (one
program) when there is no GPU, and on CUDA tensors otherwise; cuda needs a GPU.
Tolerance: max |difference| / max |w| <= 2e-5 over 20+ steps (fp32).
"""
import copy

import pytest
import torch

import fptt_fast
from fptt_fast import backends

from .utils import scaled_err


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _require(backend):
    dev = _device_for(backend)
    reason = backends.unavailable_reason(backend, dev)
    if backend == "cuda" and reason is not None:
        pytest.skip(f"cuda backend: {reason}")
    assert reason is None, reason  # cpu and triton must run on every machine
    return dev


FUSED = ["cpu", "triton", "cuda"]
TOL = 2e-5

OPTIMISERS = [
    dict(optimizer="adam", lr=1e-2, weight_decay=0.05),
    dict(optimizer="adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
    dict(optimizer="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(optimizer="sgd", lr=0.05, momentum=0.5, dampening=0.2),
    dict(optimizer="sgd", lr=0.05),
]
SHAPES = [(37, 11), (1,), (1000,), (8193,), (3, 4, 5)]


def make_pair(backend, dev, shapes, groups=False, **kw):
    ps = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    if groups:  # two groups with different learning rates
        lr = kw.get("lr", 1e-3)

        def grp(v):
            return [{"params": v[:2]}, {"params": v[2:], "lr": lr * 3}]

        ps_arg, qs_arg = grp(ps), grp(qs)
    else:
        ps_arg, qs_arg = ps, qs
    fused = fptt_fast.FPTT(ps_arg, backend=backend, **kw)
    ref = fptt_fast.FPTT(qs_arg, backend="reference", **kw)
    return ps, qs, fused, ref


def run_steps(ps, qs, fused, ref, n, none_idx=(), grad_scale=1.0):
    for _ in range(n):
        for i, (p, q) in enumerate(zip(ps, qs)):
            if i in none_idx:
                p.grad = q.grad = None
                continue
            g = grad_scale * torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()


def assert_match(ps, qs, fused, ref, tol=TOL):
    scale = max(q.abs().max().item() for q in qs)
    for p, q in zip(ps, qs):
        assert scaled_err(p, q, scale) <= tol
        for name, t in ref.state[q].items():
            assert scaled_err(fused.state[p][name], t, scale) <= tol, name


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kw", OPTIMISERS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_matches_reference_per_optimiser(backend, kw, fresh_seed):
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, SHAPES, rho=0.5, c=1.5, alpha=0.4, beta=0.6,
                                   clip=1.0, **kw)
    run_steps(ps, qs, fused, ref, 22)
    assert_match(ps, qs, fused, ref)
    assert ref.last_norm.item() > 1.0  # the clip triggered
    assert fused.last_norm.item() == pytest.approx(ref.last_norm.item(), rel=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("clip", [None, 1e9, 0.05])
@pytest.mark.parametrize("rho,c", [(0.0, 1.0), (0.5, 2.0)])
def test_clip_and_regulariser_variants(backend, clip, rho, c, fresh_seed):
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(129,), (7, 3)], clip=clip, rho=rho, c=c, lr=0.01)
    run_steps(ps, qs, fused, ref, 20)
    assert_match(ps, qs, fused, ref)


@pytest.mark.parametrize("backend", FUSED)
def test_groups_and_missing_grads(backend, fresh_seed):
    """Two groups with different lr; parameter 1 never has a gradient and must not
    move (nor its state), as with torch's optimisers."""
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(5, 3), (17,), (1,), (300,)], groups=True,
                                   lr=0.02, clip=2.0)
    w1 = ps[1].detach().clone()
    run_steps(ps, qs, fused, ref, 20, none_idx=(1,))
    assert_match(ps, qs, fused, ref)
    assert torch.equal(ps[1], w1)
    assert fused.state[ps[1]]["step"].item() == 0 and fused.state[ps[0]]["step"].item() == 20


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_everything_bitwise(backend, bad, fresh_seed):
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(50,), (3, 3)], nonfinite="skip", clip=1.0)
    run_steps(ps, qs, fused, ref, 3)
    before = [p.detach().clone() for p in ps] + [t.clone() for t in fused.flat_state.values()]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[1].grad[1, 2] = bad
    fused.step()
    after = [p.detach() for p in ps] + list(fused.flat_state.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert fused.skipped_steps == 1
    # and it carries on normally afterwards
    run_steps(ps, qs, fused, ref, 3)
    assert fused.skipped_steps == 1
    assert_match(ps, qs, fused, ref)


@pytest.mark.parametrize("backend", FUSED)
def test_nonfinite_raise(backend, fresh_seed):
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(50,)], nonfinite="raise")
    run_steps(ps, qs, fused, ref, 2)
    before = [ps[0].detach().clone()] + [t.clone() for t in fused.flat_state.values()]
    ps[0].grad = torch.randn_like(ps[0])
    ps[0].grad[7] = float("nan")
    with pytest.raises(FloatingPointError):
        fused.step()
        fused.check_finite()  # a GPU backend reports at the next synchronising call
    after = [ps[0].detach()] + list(fused.flat_state.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic_and_state_dict_round_trip(backend, fresh_seed):
    """Same inputs twice give bitwise the same result; a state_dict taken mid-run
    and loaded into a fresh optimiser continues bitwise identically."""
    dev = _require(backend)
    shapes = [(2000,), (33, 9), (1,)]
    init = [torch.randn(s, device=dev) for s in shapes]
    grads = [[torch.randn(s, device=dev) for s in shapes] for _ in range(10)]

    def run(split_at=None):
        ps = [w.clone().requires_grad_() for w in init]
        opt = fptt_fast.FPTT(ps, backend=backend, clip=1.0, rho=0.5)
        for k, gs in enumerate(grads):
            if k == split_at:  # checkpoint, rebuild everything, restore
                sd = copy.deepcopy(opt.state_dict())
                saved_w = [p.detach().clone() for p in ps]
                ps = [w.clone().requires_grad_() for w in saved_w]
                opt = fptt_fast.FPTT(ps, backend=backend, clip=0.123, rho=0.0)
                opt.load_state_dict(sd)
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps] + list(opt.flat_state.values())

    a, b, c = run(), run(), run(split_at=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("backend", FUSED)
def test_reset_and_regularizer(backend, fresh_seed):
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(40,), (6, 2)], rho=0.5, c=2.0)
    run_steps(ps, qs, fused, ref, 5)
    scale = max(q.abs().max().item() for q in qs)
    assert abs(fused.regularizer().item() - ref.regularizer().item()) <= 1e-4 * scale
    fused.reset()
    for p in ps:
        assert torch.equal(p.detach(), fused.state[p]["w_bar"])
        assert not fused.state[p]["lam"].any()


def test_cpu_backend_trains_lstm_like_reference(fresh_seed):
    """A small LSTM on the Add task trained with FPTT(backend='cpu') follows the
    reference's loss curve step for step."""
    from fptt_fast import reference, tasks

    gen = torch.Generator().manual_seed(fresh_seed)
    models = []
    for _ in range(2):
        torch.manual_seed(fresh_seed)
        models.append(reference.LSTMWithHead(2, 12, 1))
    opts = [fptt_fast.FPTT(m.parameters(), lr=1e-2, clip=1.0, backend=b)
            for m, b in zip(models, ["cpu", "reference"])]
    curves = [[], []]
    for _ in range(6):
        x, y = tasks.add_task(20, 8, generator=gen)
        for m, o, curve in zip(models, opts, curves):
            curve += [float(v) for v in reference.train_sequence_fptt(m, o, x, y, K=4)]
    assert len(curves[0]) == 24
    for a, b in zip(*curves):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    scale = max(p.abs().max().item() for p in models[1].parameters())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert scaled_err(p, q, scale) <= 1e-4


def test_cpu_binding_rejects_bad_input(fresh_seed):
    ext = backends.extension()
    p, g = torch.randn(10), torch.randn(10)
    st = [torch.randn(10) for _ in range(4)]
    step = torch.zeros(1)
    hyper = torch.rand(1, len(fptt_fast.optim.HYPER_FIELDS))
    args = lambda **o: [o.get("p", [p]), o.get("g", [g]), [st[0]], [st[1]], [st[2]], [st[3]],  # noqa: E731
                        [step], o.get("hyper", hyper), o.get("group", [0]), 1, 1.0]
    with pytest.raises(RuntimeError, match="grads.*elements"):
        ext.fused_update_cpu(*args(g=[torch.randn(11)]))
    with pytest.raises(RuntimeError, match="float32"):
        ext.fused_update_cpu(*args(g=[g.double()]))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.fused_update_cpu(*args(p=[torch.randn(20)[::2]]))
    with pytest.raises(RuntimeError, match="group index"):
        ext.fused_update_cpu(*args(group=[3]))
    with pytest.raises(RuntimeError, match="hyper"):
        ext.fused_update_cpu(*args(hyper=torch.rand(1, 5)))


@pytest.mark.parametrize("backend", FUSED)
def test_raise_reports_a_skip_even_after_later_steps(backend, fresh_seed):
    """nonfinite='raise' must not lose a bad step when more steps follow before the
    host looks (the GPU case): the report counts every skipped step."""
    dev = _require(backend)
    p = torch.randn(64, device=dev, requires_grad=True)
    opt = fptt_fast.FPTT([p], backend=backend, nonfinite="raise")
    p.grad = torch.randn_like(p)
    p.grad[0] = float("inf")
    raised = 0
    for k in range(3):  # the bad step, then two good ones
        try:
            opt.step()
        except FloatingPointError:
            raised += 1
        p.grad = torch.randn_like(p)
    try:
        opt.check_finite()
    except FloatingPointError:
        raised += 1
    assert raised == 1 and opt.skipped_steps == 1


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_loaded_clip_zero_means_no_clipping(backend, fresh_seed):
    """clip=0 means no clipping everywhere, also when it comes from a state_dict."""
    dev = "cpu" if backend == "reference" else _require(backend)
    w = torch.randn(30, device=dev)
    ps = [w.clone().requires_grad_(), w.clone().requires_grad_()]
    a = fptt_fast.FPTT([ps[0]], backend=backend, clip=0)
    b = fptt_fast.FPTT([ps[1]], backend=backend, clip=5.0)
    sd = a.state_dict()
    b.load_state_dict(sd)
    for p in ps:
        p.grad = 100 * torch.randn_like(p)
    ps[1].grad = ps[0].grad.clone()
    a.step()
    b.step()
    assert torch.equal(ps[0], ps[1])
    assert not torch.equal(ps[0], w)


@pytest.mark.parametrize("backend", FUSED)
def test_lr_changed_every_step_follows_reference(backend, fresh_seed):
    """An lr scheduler changing lr each step: the hyper table is refreshed in place."""
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(100,), (7,)], lr=0.02, clip=1.0)
    hyper_ptr = None
    for k in range(20):
        for o in (fused, ref):
            o.param_groups[0]["lr"] = 0.02 * (0.9 ** k)
        run_steps(ps, qs, fused, ref, 1)
        if hyper_ptr is None:
            hyper_ptr = fused._hyper.data_ptr()
        assert fused._hyper.data_ptr() == hyper_ptr
    assert_match(ps, qs, fused, ref)


def test_hyper_parameters_changed_later_are_validated(fresh_seed):
    for backend in ("reference", "cpu"):
        p = torch.randn(5, requires_grad=True)
        opt = fptt_fast.FPTT([p], backend=backend)
        opt.param_groups[0]["alpha"] = 0.0
        p.grad = torch.randn(5)
        with pytest.raises(ValueError, match="alpha"):
            opt.step()


@pytest.mark.parametrize("backend", FUSED)
def test_empty_parameter_steps_like_reference(backend, fresh_seed):
    """A zero-element parameter with a (zero-element) gradient: its step count
    advances as with the reference (and torch), nothing else is touched."""
    dev = _require(backend)
    ps, qs, fused, ref = make_pair(backend, dev, [(0,), (33,)], clip=1.0)
    run_steps(ps, qs, fused, ref, 3)
    assert fused.state[ps[0]]["step"].item() == ref.state[qs[0]]["step"].item() == 3
    assert_match(ps[1:], qs[1:], fused, ref)
