"""Every fused backend of the FPTT optimiser (cpu, triton, cuda) against the reference.

Each backend runs on its own device (tests/utils.py: backend_device): cpu on CPU tensors;
triton on CUDA tensors when there is a GPU (many programs and their grid barrier), else
through Triton's interpreter on CPU tensors; cuda on a GPU only (skipped elsewhere).
Tolerance: max |difference| / max |w| <= 2e-5 (fp32), compared after every step of 20+.
What only one backend has (graph capture, launch counts, grid limits, binding errors)
is tested in test_update_cuda.py and test_update_triton.py.
"""
import copy
import dataclasses
import math

import pytest
import torch

import fptt_fast
from fptt_fast import backends
from fptt_fast.seam import FpttState

from .utils import (FUSED, NONE_GRAD, SPLIT, TOL_MATMUL, assert_bitwise_equal,
                    assert_norm_close, assert_unchanged, backend_device, compare, draw_grads,
                    interpreted, make_pair, run_steps, scaled_err, set_grads, shapes_for,
                    snapshot, step_pair, two_groups)


# optimizer, kwargs (clip, rho, c, lr and the base optimiser's), one per case
CASES = [
    dict(optimizer="sgd", momentum=0.9, nesterov=True, clip=0.1, rho=0.5, c=2.0, lr=0.05),  # clips
    dict(optimizer="sgd", weight_decay=0.01, clip=None, rho=0.0, c=1.5, lr=0.05),           # plain
    dict(optimizer="sgd", momentum=0.8, dampening=0.2, weight_decay=0.02, clip=1e6, rho=0.5, c=0.7,
         lr=0.03),
    dict(optimizer="adam", weight_decay=0.01, clip=1e6, rho=0.5, c=2.0, lr=0.01),            # idle clip
    dict(optimizer="adam", weight_decay=0.01, betas=(0.8, 0.99), clip=1e6, rho=0.5, c=2.0, lr=0.01),
    dict(optimizer="adam", betas=(0.8, 0.99), clip=0.1, rho=0.0, c=2.0, lr=0.01),
    dict(optimizer="adamw", weight_decay=0.05, clip=0.1, rho=0.0, c=0.7, lr=0.01),
    dict(optimizer="adamw", weight_decay=0.1, clip=None, rho=0.5, c=1.0, lr=0.02),
    # alpha, beta away from 0.5 in group 0 too; the clip at 1.0 triggers
    dict(optimizer="adam", lr=1e-2, weight_decay=0.05, rho=0.5, c=1.5, alpha=0.4, beta=0.6, clip=1.0),
    dict(optimizer="adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), rho=0.5, c=1.5, alpha=0.4,
         beta=0.6, clip=1.0),
    dict(optimizer="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01, rho=0.5, c=1.5,
         alpha=0.4, beta=0.6, clip=1.0),
    dict(optimizer="sgd", lr=0.05, momentum=0.5, dampening=0.2, rho=0.5, c=1.5, alpha=0.4, beta=0.6,
         clip=1.0),
    dict(optimizer="sgd", lr=0.05, rho=0.5, c=1.5, alpha=0.4, beta=0.6, clip=1.0),
]


def case_id(kw):
    return "-".join(f"{k}{v}" for k, v in kw.items())


def pair(backend, dev, kw, nonfinite="raise"):
    """The standard pair: the device's shapes in two groups, from a random FPTT state."""
    return make_pair(backend, shapes_for(dev), device=dev, split=SPLIT,
                     group1=two_groups(kw.get("lr", 1e-3)), random_state=True,
                     nonfinite=nonfinite, **kw)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kw", CASES, ids=case_id)
def test_matches_reference(backend, kw, fresh_seed):
    dev = backend_device(backend)
    steps = 24 if dev == "cuda" else 22
    pa, pb, oa, ob = pair(backend, dev, kw)
    w_none = snapshot(pa[NONE_GRAD:NONE_GRAD + 1], oa, flat=False)
    clip = kw["clip"]
    for _ in range(steps):
        run_steps(pa, pb, oa, ob, 1, none_idx=NONE_GRAD)
        assert math.isfinite(oa.last_norm.item())
        assert oa._status[1].item() == 0.0
        if clip is not None:  # the case really clips, or really does not
            assert (ob.last_norm.item() > clip) == (clip <= 1.0), (ob.last_norm.item(), clip)
    # The parameter without a gradient was left alone (w, w_bar, lam, step), as torch does.
    assert_unchanged(pa[NONE_GRAD:NONE_GRAD + 1], oa, w_none)
    assert oa.state[pa[NONE_GRAD]]["step"].item() == 0
    assert all(oa.state[p]["step"].item() == steps for i, p in enumerate(pa) if i != NONE_GRAD)
    assert oa.skipped_steps == 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("clip", [None, 1e9, 0.05])
@pytest.mark.parametrize("rho,c", [(0.0, 1.0), (0.5, 2.0)])
def test_clip_and_regulariser_variants(backend, clip, rho, c, fresh_seed):
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(129,), (7, 3)], device=dev, clip=clip, rho=rho, c=c,
                               lr=0.01)
    run_steps(pa, pb, oa, ob, 20)


@pytest.mark.parametrize("backend", FUSED)
def test_groups_and_missing_grads(backend, fresh_seed):
    """Two groups with different lr; parameter 1 never has a gradient and must not
    move (nor its state), as with torch's optimisers."""
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(5, 3), (17,), (1,), (300,)], device=dev, split=2,
                               group1={"lr": 0.06}, lr=0.02, clip=2.0)
    w1 = pa[1].detach().clone()
    run_steps(pa, pb, oa, ob, 20, none_idx=1)
    assert torch.equal(pa[1], w1)
    assert oa.state[pa[1]]["step"].item() == 0 and oa.state[pa[0]]["step"].item() == 20


@pytest.mark.parametrize("backend", FUSED)
def test_fresh_grad_tensors_and_changing_sets(backend, fresh_seed):
    """New .grad tensors every step (cached tables miss, are rebuilt), a changing set of
    parameters with a gradient, and an lr changed between steps (hyper row refresh)."""
    dev = backend_device(backend)
    pa, pb, oa, ob = pair(backend, dev, dict(optimizer="adam", weight_decay=0.01, clip=0.5,
                                             rho=0.5, c=2.0, lr=0.01))
    for step in range(6 if interpreted(backend) else 12):
        if step == 3:
            for o in (oa, ob):
                o.param_groups[1]["lr"] = 0.002
        step_pair(pa, pb, oa, ob, draw_grads(pa, none_idx=step % len(pa)), reuse=False)
        compare(pa, pb, oa, ob)


@pytest.mark.parametrize("backend", FUSED)
def test_misaligned_parameter(backend, fresh_seed):
    """A parameter starting 4 bytes past a 16-byte boundary: vector paths are off for it,
    the scalar path must give the same results."""
    dev = backend_device(backend)
    chunk = 2048 if interpreted(backend) else 4096  # tensors across a chunk boundary
    big = torch.randn(chunk + 905, device=dev)
    params = [big[1:], torch.randn(3, device=dev), torch.randn(chunk + 5, device=dev)]
    assert params[0].data_ptr() % 16 == 4 and params[0].is_contiguous()
    pa, pb, oa, ob = make_pair(backend, params, device=dev, lr=0.01, optimizer="adam", clip=0.3,
                               rho=0.5, c=2.0)
    run_steps(pa, pb, oa, ob, 8 if interpreted(backend) else 20)  # one scalar program there


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_single_one_element_tensor(backend, optimizer, fresh_seed):
    """One tensor, one chunk, one block (a grid barrier with a grid of one)."""
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(1,)], device=dev, lr=0.01, optimizer=optimizer,
                               clip=0.3, rho=0.5, c=2.0)
    run_steps(pa, pb, oa, ob, 8 if interpreted(backend) else 20)  # always one program there


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("optimizer,opt_kw", [("adam", {}), ("sgd", dict(momentum=0.9))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip(backend, optimizer, opt_kw, bad, fresh_seed):
    """A step with one inf/NaN gradient element changes nothing (bitwise) and is counted;
    the steps after it carry on normally."""
    dev = backend_device(backend)
    pa, pb, oa, ob = pair(backend, dev, dict(optimizer=optimizer, clip=1.0, rho=0.5, c=2.0,
                                             lr=0.01, **opt_kw), nonfinite="skip")
    for step in range(7):
        grads = draw_grads(pa, NONE_GRAD)
        if step == 3:
            grads[2].view(-1)[1234] = bad
            snap = snapshot(pa, oa)
        step_pair(pa, pb, oa, ob, grads)
        if step == 3:
            assert_unchanged(pa, oa, snap)  # bitwise: w, w_bar, lam, optimiser state, step
            assert oa.skipped_steps == 1
            assert oa._status[1].item() == 1.0
            assert not math.isfinite(oa.last_norm.item())
        else:
            assert oa._status[1].item() == 0.0
            assert_norm_close(oa, ob)
        compare(pa, pb, oa, ob)
    assert oa.skipped_steps == ob.skipped_steps == 1
    assert all(oa.state[p]["step"].item() == 6 for i, p in enumerate(pa) if i != NONE_GRAD)


@pytest.mark.parametrize("backend", FUSED)
def test_nonfinite_raise(backend, fresh_seed):
    """nonfinite='raise': FloatingPointError at step() (the result is on the host) or at
    the next synchronising call (a GPU); the step changed nothing; training goes on."""
    dev = backend_device(backend)
    pa, pb, oa, ob = pair(backend, dev, dict(optimizer="adamw", weight_decay=0.01, clip=None,
                                             rho=0.0, c=1.0, lr=0.01))
    for step in range(5):
        grads = draw_grads(pa, NONE_GRAD)
        if step == 2:
            grads[0][3, 4] = float("nan")
            snap = snapshot(pa, oa)
            set_grads(pa, grads)
            with pytest.raises(FloatingPointError):
                oa.step()
                oa.check_finite()
            assert_unchanged(pa, oa, snap)
            assert oa.skipped_steps == 1
            continue
        step_pair(pa, pb, oa, ob, grads)
        oa.check_finite()
        compare(pa, pb, oa, ob)


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic_and_state_dict_round_trip(backend, fresh_seed):
    """Same inputs twice give bitwise the same result (the norm's partial sums are added
    in a fixed order; on a GPU also with many blocks); a state_dict taken mid-run and
    loaded into a fresh optimiser continues bitwise identically. Adam and SGD; Adam only
    in the interpreter (one program: no order to vary, and slow)."""
    dev = backend_device(backend)
    shapes = shapes_for(dev) + ([(3_000_001,)] if dev == "cuda" else [])
    init = [torch.randn(s, device=dev) for s in shapes]
    grads = [draw_grads(init, NONE_GRAD) for _ in range(10)]

    def run(optimizer, split_at=None):
        def build(ws, clip, rho):
            ps = [w.clone() for w in ws]
            groups = [{"params": ps[:SPLIT]}, {"params": ps[SPLIT:], **two_groups(0.01)}]
            return ps, fptt_fast.FPTT(groups, backend=backend, lr=0.01, optimizer=optimizer,
                                      weight_decay=0.01, c=2.0, nonfinite="skip", clip=clip,
                                      rho=rho)

        ps, opt = build(init, 0.5, 0.5)
        norms = []
        for k, gs in enumerate(grads):
            if k == split_at:  # checkpoint, rebuild everything (other options), restore
                sd = copy.deepcopy(opt.state_dict())
                ps, opt = build([p.detach() for p in ps], 0.123, 0.0)
                opt.load_state_dict(sd)
            set_grads(ps, gs)
            opt.step()
            norms.append(opt.last_norm.clone())
        return ps, opt, torch.stack(norms)

    for optimizer in ("adam",) if interpreted(backend) else ("adam", "sgd"):
        (pa, oa, na), (pb, ob, nb) = run(optimizer), run(optimizer)
        pc, oc, nc = run(optimizer, split_at=5)
        assert torch.equal(na, nb) and torch.equal(na, nc), (optimizer, na, nb, nc)
        assert_bitwise_equal(pa, pb, oa, ob)
        assert_bitwise_equal(pa, pc, oa, oc)


@pytest.mark.parametrize("backend", FUSED)
def test_reset_and_regularizer(backend, fresh_seed):
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(40,), (6, 2)], device=dev, rho=0.5, c=2.0)
    run_steps(pa, pb, oa, ob, 5)
    scale = max(q.abs().max().item() for q in pb)
    assert abs(oa.regularizer().item() - ob.regularizer().item()) <= TOL_MATMUL * scale
    oa.reset()
    for p in pa:
        assert torch.equal(p.detach(), oa.state[p]["w_bar"])
        assert not oa.state[p]["lam"].any()


@pytest.mark.parametrize("backend", FUSED)
def test_raise_reports_a_skip_even_after_later_steps(backend, fresh_seed):
    """nonfinite='raise' must not lose a bad step when more steps follow before the
    host looks (the GPU case): the report counts every skipped step."""
    dev = backend_device(backend)
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


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_loaded_clip_zero_means_no_clipping(backend, fresh_seed):
    """clip=0 means no clipping everywhere, also when it comes from a state_dict."""
    dev = backend_device(backend)
    w = torch.randn(30, device=dev)
    ps = [w.clone().requires_grad_(), w.clone().requires_grad_()]
    a = fptt_fast.FPTT([ps[0]], backend=backend, clip=0)
    b = fptt_fast.FPTT([ps[1]], backend=backend, clip=5.0)
    b.load_state_dict(a.state_dict())
    ps[0].grad = 100 * torch.randn_like(ps[0])
    ps[1].grad = ps[0].grad.clone()
    a.step()
    b.step()
    assert torch.equal(ps[0], ps[1])
    assert not torch.equal(ps[0], w)


@pytest.mark.parametrize("backend", FUSED)
def test_lr_changed_every_step_follows_reference(backend, fresh_seed):
    """An lr scheduler changing lr each step: the hyper table is refreshed in place."""
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(100,), (7,)], device=dev, lr=0.02, clip=1.0)
    hyper_ptr = None
    for k in range(20):
        for o in (oa, ob):
            o.param_groups[0]["lr"] = 0.02 * (0.9 ** k)
        run_steps(pa, pb, oa, ob, 1)
        if hyper_ptr is None:
            hyper_ptr = oa._hyper.data_ptr()
        assert oa._hyper.data_ptr() == hyper_ptr


@pytest.mark.parametrize("backend", FUSED)
def test_empty_parameter_steps_like_reference(backend, fresh_seed):
    """A zero-element parameter with a (zero-element) gradient: its step count
    advances as with the reference (and torch), nothing else is touched."""
    dev = backend_device(backend)
    pa, pb, oa, ob = make_pair(backend, [(0,), (33,)], device=dev, clip=1.0)
    run_steps(pa, pb, oa, ob, 3)
    assert oa.state[pa[0]]["step"].item() == ob.state[pb[0]]["step"].item() == 3


def test_hyper_parameters_changed_later_are_validated(fresh_seed):
    for backend in ("reference", "cpu"):
        p = torch.randn(5, requires_grad=True)
        opt = fptt_fast.FPTT([p], backend=backend)
        opt.param_groups[0]["alpha"] = -0.5
        p.grad = torch.randn(5)
        with pytest.raises(ValueError, match="alpha"):
            opt.step()


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
        assert a == pytest.approx(b, rel=TOL_MATMUL, abs=1e-6)
    scale = max(p.abs().max().item() for p in models[1].parameters())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert scaled_err(p, q, scale) <= TOL_MATMUL


def test_cpu_binding_rejects_bad_input(fresh_seed):
    ext = backends.extension()
    p, g = torch.randn(10), torch.randn(10)
    p0 = p.clone()
    st = [torch.randn(10) for _ in range(4)]
    step = torch.zeros(1)
    hyper = torch.rand(1, len(fptt_fast.optim.HYPER_FIELDS))
    state = lambda **o: FpttState(  # noqa: E731
        o.get("p", [p]), o.get("g", [g]), [st[0]], [st[1]], [st[2]], [st[3]], [step],
        o.get("hyper", hyper), o.get("group", [0]), optimizer=1, clip=1.0)
    with pytest.raises(RuntimeError, match=r"state\.grads\[0\].*elements"):
        ext.fused_update_cpu(state(g=[torch.randn(11)]))
    with pytest.raises(RuntimeError, match="float32"):
        ext.fused_update_cpu(state(g=[g.double()]))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.fused_update_cpu(state(p=[torch.randn(20)[::2]]))
    with pytest.raises(RuntimeError, match="group index"):
        ext.fused_update_cpu(state(group=[3]))
    with pytest.raises(RuntimeError, match=r"state\.hyper"):
        ext.fused_update_cpu(state(hyper=torch.rand(1, 5)))
    with pytest.raises(TypeError, match=r"FpttState\.clip"):
        ext.fused_update_cpu(dataclasses.replace(state(), clip="1.0"))
    assert torch.equal(p, p0)  # every refused call changed nothing

