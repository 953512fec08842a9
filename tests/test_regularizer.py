"""The regulariser's three modes on every backend: coupled (the paper's FPTT, tested at
length in test_update.py and test_lstm.py), off (alpha=0) and decoupled.

- alpha=0 is the base optimiser on the clipped task gradient: compared with
  torch.optim.SGD/Adam/AdamW + clip_grad_norm_, with w_bar and lam left bitwise as they
  were (even when lam is not zero).
- decoupled: the reference against the same update written out independently (torch's
  optimiser on the clipped task gradient, then w -= lr * regulariser gradient at the old
  w, then the dual and the average); every fused backend against the reference, for
  FPTT.step() and FPTTLSTM's segment step.
Tolerances on the parameters' scale (max |w|): 2e-5 for the update, 1e-4 through matmuls.
"""
import pytest
import torch

import fptt_fast
from fptt_fast import reference

from .utils import (FUSED, TOL_MATMUL, TOL_UPDATE, LSTMPair, backend_device, interpreted,
                    make_pair, run_steps, scaled_err)

TORCH_OPT = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
}
SHAPES = [(33, 7), (129,), (1,), (4, 4, 3)]


def random_fptt_state(opt, params):
    """A w_bar and lam far from (w, 0), as after training with the regulariser on."""
    for p in params:
        opt.state[p]["w_bar"].copy_(p.detach() + torch.randn_like(p))
        opt.state[p]["lam"].copy_(torch.randn_like(p))


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("name", sorted(TORCH_OPT))
@pytest.mark.parametrize("clip", [0.5, None])
def test_alpha_zero_is_the_base_optimiser(backend, name, clip, fresh_seed):
    dev = "cpu" if backend == "reference" else backend_device(backend)
    cls, kw = TORCH_OPT[name]
    pa = [torch.randn(s, device=dev) for s in SHAPES]
    pt = [p.clone() for p in pa]
    fptt = fptt_fast.FPTT(pa, optimizer=name, alpha=0.0, rho=0.5, c=2.0, clip=clip,
                          backend=backend, **kw)
    torch_opt = cls(pt, **kw)
    random_fptt_state(fptt, pa)
    kept = [(fptt.state[p]["w_bar"].clone(), fptt.state[p]["lam"].clone()) for p in pa]
    scale = max(p.abs().max().item() for p in pt)
    for step in range(6 if interpreted(backend) else 22):
        grads = [torch.randn_like(p) for p in pa]
        for p, q, g in zip(pa, pt, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fptt.step()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(pt, clip)
            assert norm.item() > clip  # the case really clips
        torch_opt.step()
        for i, (p, q) in enumerate(zip(pa, pt)):
            assert scaled_err(p, q, scale) <= TOL_UPDATE, (step, i)
    for p, (w_bar, lam) in zip(pa, kept):
        assert torch.equal(fptt.state[p]["w_bar"], w_bar)
        assert torch.equal(fptt.state[p]["lam"], lam)
    assert fptt.regularizer().item() == 0.0


def decoupled_by_hand(params, grads, w_bar, lam, torch_opt, h, clip):
    """The decoupled update written out: torch's optimiser on the clipped task gradient,
    then the regulariser's step at the old w, then steps 5 and 6."""
    r = [(h.rho - 1.0) * l + h.c * h.alpha * (p.detach() - b) for p, b, l in zip(params, w_bar, lam)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    torch_opt.step()
    with torch.no_grad():
        for p, ri, b, l in zip(params, r, w_bar, lam):
            p.sub_(h.lr * ri)
            l.sub_(h.alpha * (p - b))
            b.mul_(1.0 - h.beta).add_(h.beta * p - (h.beta / h.alpha) * l)


@pytest.mark.parametrize("name", sorted(TORCH_OPT))
def test_decoupled_reference_against_the_update_written_out(name, fresh_seed):
    cls, kw = TORCH_OPT[name]
    pa = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    pt = [p.clone() for p in pa]
    hyper = dict(alpha=0.4, beta=0.6, rho=0.5, c=1.5)
    h = reference.Hyper(lr=kw["lr"], **hyper)
    states = []
    for p in pa:
        st = {"w_bar": p + torch.randn_like(p), "lam": torch.randn_like(p),
              "step": torch.zeros((), dtype=torch.float64)}
        if name == "sgd":
            st["momentum_buffer"] = torch.zeros_like(p)
        else:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        states.append(st)
    w_bar = [s["w_bar"].clone() for s in states]
    lam = [s["lam"].clone() for s in states]
    full = reference.Hyper(**{**h.__dict__, **{k: v for k, v in kw.items() if k != "lr"},
                              "decoupled": True})
    torch_opt = cls(pt, **kw)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in pa]
        reference.fptt_update_(pa, grads, states, [full] * len(pa), name, clip=0.5)
        decoupled_by_hand(pt, grads, w_bar, lam, torch_opt, h, clip=0.5)
        for p, q, s, b, l in zip(pa, pt, states, w_bar, lam):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
            torch.testing.assert_close(s["w_bar"], b, rtol=0, atol=1e-12)
            torch.testing.assert_close(s["lam"], l, rtol=0, atol=1e-12)


DECOUPLED_CASES = [
    dict(optimizer="adam", decoupled=True, clip=1.0, rho=0.5, c=1.5, alpha=0.4, beta=0.6, lr=0.01),
    dict(optimizer="adamw", decoupled=True, weight_decay=0.05, clip=0.1, lr=0.01),
    dict(optimizer="sgd", decoupled=True, momentum=0.8, dampening=0.2, clip=1.0, rho=0.5, lr=0.05),
    dict(optimizer="adam", alpha=0.0, clip=1.0, rho=0.5, c=1.5, lr=0.01),
    dict(optimizer="sgd", alpha=0.0, momentum=0.9, clip=None, lr=0.05),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kw", DECOUPLED_CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_fused_update_matches_reference(backend, kw, fresh_seed):
    """Two groups (group 1: alpha 0.3, other lr and beta, the same mode), from a random
    FPTT state, 22 steps (6 in the interpreter)."""
    dev = backend_device(backend)
    shapes = [(5000,), (33, 7), (129,)] if not interpreted(backend) else [(300,), (33, 7)]
    pa, pb, oa, ob = make_pair(backend, shapes, device=dev, split=1,
                               group1={"lr": kw["lr"] * 0.3, "alpha": 0.3, "beta": 0.7},
                               random_state=True, **kw)
    run_steps(pa, pb, oa, ob, 6 if interpreted(backend) else 22)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["alpha0", "decoupled"])
def test_lstm_segment_step_matches_reference(backend, mode, fresh_seed):
    """FPTTLSTM's fused segment step (cpu: one C++ call; triton, cuda: one launch) in
    both modes, from a random FPTT state, segment after segment. SGD with momentum: the
    two sides' gradients differ by rounding, and Adam turns that into a step of up to lr
    where a gradient is near zero (seed 555 went 2 % over the tolerance that way); Adam's
    own step in both modes is test_fused_update_matches_reference's, on equal gradients."""
    dev = backend_device(backend, "lstm")
    opt = dict(alpha=0.0) if mode == "alpha0" else dict(decoupled=True, rho=0.5, alpha=0.4)
    pair = LSTMPair(backend, 3, 7, 2, loss="mse", device=dev, fptt_state=0.5, lr=0.05,
                    optimizer="sgd", momentum=0.9, clip=1.0, **opt)
    pair.run(4, [3, 1, 5] if interpreted(backend) else [3, 1, 5, 2, 4, 6, 1, 3, 2, 5],
             state_tol=TOL_MATMUL)


def test_reset_leaves_alpha_zero_groups_alone(fresh_seed):
    """reset() (w <- w_bar, lam <- 0) would throw away training where alpha == 0, whose
    w_bar never moves: such groups are left alone, the others reset."""
    a, b = torch.randn(10), torch.randn(10)
    opt = fptt_fast.FPTT([{"params": [a], "alpha": 0.0}, {"params": [b]}], backend="reference")
    random_fptt_state(opt, [a, b])
    a0 = a.clone()
    opt.reset()
    assert torch.equal(a, a0)
    assert torch.equal(b, opt.state[b]["w_bar"]) and not opt.state[b]["lam"].any()


def test_state_dict_without_decoupled_loads_as_coupled():
    """A state dict saved before `decoupled` existed means the coupled regulariser."""
    p = torch.randn(4)
    opt = fptt_fast.FPTT([p], decoupled=True, backend="reference")
    sd = opt.state_dict()
    del sd["param_groups"][0]["decoupled"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["decoupled"] is False


@pytest.mark.parametrize("bad", [-0.1, float("nan"), 1e-46])
def test_bad_alpha_is_refused(bad):
    with pytest.raises(ValueError, match="alpha"):
        fptt_fast.FPTT([torch.randn(3)], alpha=bad)


def test_bad_decoupled_is_refused():
    with pytest.raises(ValueError, match="decoupled"):
        fptt_fast.FPTT([torch.randn(3)], decoupled=1)


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_missing_grad_zero_regularises_every_parameter(backend, fresh_seed):
    """missing_grad="zero": a parameter without .grad steps as with an explicit zero
    gradient (regulariser, clip norm, step count); the default leaves it alone. Its buffer
    is zeroed each step even after a backward wrote into it."""
    shapes = [(7, 3), (11,)]
    w0 = [torch.randn(s) for s in shapes]
    w_bar0, lam0 = [w + torch.randn_like(w) for w in w0], [torch.randn_like(w) for w in w0]
    runs = {}
    for mode in ("zero", "explicit", "skip"):
        ps = [w.clone().requires_grad_() for w in w0]
        opt = fptt_fast.FPTT(ps, lr=0.01, clip=1.0, backend=backend,
                             missing_grad="zero" if mode == "zero" else "skip")
        for p, b, l in zip(ps, w_bar0, lam0):  # the same FPTT state for every mode
            opt.state[p]["w_bar"].copy_(b)
            opt.state[p]["lam"].copy_(l)
        runs[mode] = (ps, opt)
    gens = [torch.Generator().manual_seed(fresh_seed) for _ in runs]
    for step in range(12):
        for (mode, (ps, opt)), gen in zip(runs.items(), gens):
            g0 = torch.randn(shapes[0], generator=gen)
            ps[0].grad = g0
            if mode == "explicit":
                ps[1].grad = torch.zeros(shapes[1])
            elif step == 5 and mode == "zero":
                ps[1].grad.add_(1.0)  # as a backward reaching it once would; zeroed again below
                ps[1].grad = None
            else:
                ps[1].grad = None
            opt.step()
    (pz, oz), (pe, oe), (ps_, os_) = runs["zero"], runs["explicit"], runs["skip"]
    for a, b in zip(pz, pe):
        assert torch.equal(a, b) and torch.equal(oz.state[a]["lam"], oe.state[b]["lam"])
    assert oz.state[pz[1]]["step"].item() == 12 and os_.state[ps_[1]]["step"].item() == 0
    assert not torch.equal(pz[1], ps_[1])  # the regulariser moved it; skip did not


def test_reset_keeps_lam_when_asked(fresh_seed):
    p = torch.randn(6)
    opt = fptt_fast.FPTT([p], backend="reference")
    random_fptt_state(opt, [p])
    lam = opt.state[p]["lam"].clone()
    opt.reset(lam=False)
    assert torch.equal(p, opt.state[p]["w_bar"]) and torch.equal(opt.state[p]["lam"], lam)
    opt.reset()
    assert not opt.state[p]["lam"].any()


def test_missing_grad_is_checked_and_survives_copies():
    import copy

    with pytest.raises(ValueError, match="missing_grad"):
        fptt_fast.FPTT([torch.randn(3)], missing_grad="ignore")
    p = torch.randn(4)
    opt = fptt_fast.FPTT([p], missing_grad="zero", backend="reference")
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.missing_grad == "zero" and twin._zero_grads == {}
    twin.step()
    assert twin.state[twin.param_groups[0]["params"][0]]["step"].item() == 2


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("name", sorted(TORCH_OPT))
def test_take_over_a_torch_optimiser(backend, name, fresh_seed):
    """Train with torch's optimiser, hand its state to FPTT(alpha=0) with
    load_torch_state_dict: both then go on to the same parameters (within 2e-5 of max |w|),
    W̄ = w and λ = 0 at the take-over, the hyper-parameters taken from the state_dict."""
    cls, kw = TORCH_OPT[name]
    pt = [torch.randn(s) for s in SHAPES]
    torch_opt = cls(pt, **kw)
    for _ in range(5):
        for p in pt:
            p.grad = torch.randn_like(p)
        torch_opt.step()
    pa = [p.detach().clone() for p in pt]
    fptt = fptt_fast.FPTT(pa, optimizer=name, alpha=0.0, lr=123.0, backend=backend)
    fptt.load_torch_state_dict(torch_opt.state_dict())
    assert fptt.param_groups[0]["lr"] == kw["lr"]
    assert all(torch.equal(fptt.state[p]["w_bar"], p) and not fptt.state[p]["lam"].any() for p in pa)
    scale = max(p.abs().max().item() for p in pt)
    for _ in range(10):
        for p, q in zip(pa, pt):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.clone()
        torch_opt.step()
        fptt.step()
    for p, q in zip(pa, pt):
        assert scaled_err(p, q, scale) <= TOL_UPDATE


def test_take_over_refuses_what_does_not_fit():
    p = torch.randn(4)
    adam = torch.optim.Adam([p.clone()], lr=0.1)
    adam.state_dict()
    fptt = fptt_fast.FPTT([p], optimizer="sgd", backend="reference")
    with pytest.raises(ValueError, match="misses 'momentum'"):
        fptt.load_torch_state_dict(adam.state_dict())
    fptt = fptt_fast.FPTT([p], backend="reference")
    with pytest.raises(ValueError, match="an FPTT state_dict goes to load_state_dict"):
        fptt.load_torch_state_dict(fptt.state_dict())
    with pytest.raises(ValueError, match="amsgrad=True"):
        fptt.load_torch_state_dict(torch.optim.Adam([p.clone()], amsgrad=True).state_dict())
    two = torch.optim.Adam([p.clone(), p.clone()])
    with pytest.raises(ValueError, match="2 parameters in the state_dict, 1 here"):
        fptt.load_torch_state_dict(two.state_dict())


def test_take_over_checks_every_group_before_changing_one():
    """A bad value in the second group raises and leaves the first group as it was; a
    tensor lr (which torch allows) arrives as a float."""
    a, b = torch.randn(4), torch.randn(3)
    fptt = fptt_fast.FPTT([{"params": [a]}, {"params": [b]}], lr=0.5, backend="reference")
    sd = torch.optim.Adam([{"params": [a.clone()], "lr": torch.tensor(0.01)},
                           {"params": [b.clone()]}], lr=0.1).state_dict()
    sd["param_groups"][1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="group 1: .*beta"):
        fptt.load_torch_state_dict(sd)
    assert [g["lr"] for g in fptt.param_groups] == [0.5, 0.5]
    sd["param_groups"][1]["betas"] = (0.8, 0.99)
    fptt.load_torch_state_dict(sd)
    lr0 = fptt.param_groups[0]["lr"]
    assert type(lr0) is float and lr0 == pytest.approx(0.01)
    assert fptt.param_groups[1]["betas"] == (0.8, 0.99)


def test_an_optimiser_pickled_before_decoupled_existed_steps():
    """Unpickling fills the group keys added since (decoupled) with their old meaning."""
    import pickle

    p = torch.randn(4)
    opt = fptt_fast.FPTT([p], backend="reference")
    state = opt.__getstate__()
    del state["param_groups"][0]["decoupled"]
    old = fptt_fast.FPTT.__new__(fptt_fast.FPTT)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.param_groups[0]["decoupled"] is False
    old.param_groups[0]["params"][0].grad = torch.randn(4)
    old.step()


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("where", ["w_bar", "lam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decoupled_skips_a_nonfinite_regulariser_state(backend, where, bad, fresh_seed):
    """Decoupled, the norm sums the task gradient alone, yet a non-finite w_bar or lam
    must skip the step as it does when coupled (nothing changes, the skip is counted);
    with alpha=0 the regulariser's state is unused, so the step goes on."""
    dev = backend_device(backend)
    params = [torch.randn(300, device=dev), torch.randn(33, 7, device=dev)]
    opt = fptt_fast.FPTT([{"params": params[:1]}, {"params": params[1:], "alpha": 0.0}],
                         lr=0.01, decoupled=True, rho=0.5, nonfinite="skip", backend=backend)
    random_fptt_state(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.state[params[1]][where].view(-1)[5] = bad   # alpha=0 group: unused
    before = [p.clone() for p in params]
    opt.step()
    assert opt.skipped_steps == 0 and not any(torch.equal(p, b) for p, b in zip(params, before))
    opt.state[params[0]][where].view(-1)[7] = bad
    before = [p.clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params}
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v, ) or (k == where and torch.equal(
                opt.state[p][k].nan_to_num(), v.nan_to_num())), k
