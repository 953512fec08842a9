"""The reference (fptt_fast.reference and FPTT(backend='reference')) against
independent computations: torch.optim's own optimisers, autograd, nn.LSTM and the
paper's closed forms. Everything else is tested against this reference."""
import math

import pytest
import torch

import fptt_fast
from fptt_fast import reference
from fptt_fast.reference import Hyper

from .utils import scaled_err

TORCH_OPT = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def independent_fptt(params, optimizer, kw, alpha, beta, rho, c, clip):
    """docs/ALGORITHM.md steps 2-6 written out per element, with torch.optim itself as step 4."""
    topt = TORCH_OPT[optimizer](params, foreach=False, **kw)
    w_bar = [p.detach().clone() for p in params]
    lam = [torch.zeros_like(p) for p in params]
    clipped = []

    def step(grads):
        with torch.no_grad():
            g_reg = [g + (rho - 1.0) * l + c * alpha * (p - wb)
                     for p, g, l, wb in zip(params, grads, lam, w_bar)]
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_reg))
            coef = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
            clipped.append(coef < 1.0)
            for p, g in zip(params, g_reg):
                p.grad = g * coef
        topt.step()
        with torch.no_grad():
            for p, l, wb in zip(params, lam, w_bar):
                l -= alpha * (p - wb)
                wb.copy_((1 - beta) * wb + beta * p - (beta / alpha) * l)

    return step, w_bar, lam, clipped


CASES = [
    ("sgd", dict(lr=0.05), 0.0, 1.0, None),
    ("sgd", dict(lr=0.02, momentum=0.9, weight_decay=0.01), 0.5, 2.0, 1.0),
    ("sgd", dict(lr=0.02, momentum=0.8, nesterov=True), 0.0, 1.0, 0.5),
    ("sgd", dict(lr=0.02, momentum=0.8, dampening=0.3), 0.5, 1.0, None),
    ("adam", dict(lr=1e-2, weight_decay=0.05), 0.0, 1.0, 1.0),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6), 0.5, 2.0, None),
    ("adamw", dict(lr=1e-2, weight_decay=0.1), 0.5, 1.5, 0.3),
]


@pytest.mark.parametrize("optimizer,kw,rho,c,clip", CASES)
def test_reference_update_matches_independent(optimizer, kw, rho, c, clip, fresh_seed):
    alpha, beta = 0.6, 0.4
    shapes = [(5, 7), (13,), (1,), (3, 4, 2)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = fptt_fast.FPTT(ps, optimizer=optimizer, backend="reference", alpha=alpha, beta=beta,
                         rho=rho, c=c, clip=clip, **kw)
    step, w_bar, lam, clipped = independent_fptt(qs, optimizer, kw, alpha, beta, rho, c, clip)
    for _ in range(25):
        grads = [3 * torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        step(grads)
    scale = max(p.abs().max().item() for p in ps)
    for p, q, wb, l in zip(ps, qs, w_bar, lam):
        assert scaled_err(p, q, scale) <= 2e-5
        assert scaled_err(opt.state[p]["w_bar"], wb, scale) <= 2e-5
        assert scaled_err(opt.state[p]["lam"], l, scale) <= 2e-5
    if clip is not None:  # the clip must have acted for the case to mean anything
        assert any(clipped)


def test_clip_not_triggering_is_identity(fresh_seed):
    p = torch.randn(40, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a = fptt_fast.FPTT([p], backend="reference", clip=1e9)
    b = fptt_fast.FPTT([q], backend="reference", clip=None)
    for _ in range(20):
        g = torch.randn(40)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)


def test_analytic_regulariser_gradient_is_autograd(fresh_seed):
    h = Hyper(alpha=0.7, rho=0.3, c=1.7)
    w = torch.randn(6, 5, requires_grad=True)
    w_bar, lam = torch.randn(6, 5), torch.randn(6, 5)
    value = reference.regularizer_value(w, w_bar, lam, h)
    (auto,) = torch.autograd.grad(value, w)
    assert torch.allclose(reference.regularizer_grad(w.detach(), w_bar, lam, h), auto,
                          rtol=1e-6, atol=1e-6)


def test_optimizer_regularizer_sums_all_parameters(fresh_seed):
    ps = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = fptt_fast.FPTT(ps, backend="reference", alpha=0.5, rho=0.5, c=2.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    h = Hyper(alpha=0.5, rho=0.5, c=2.0)
    expect = sum(((h.rho - 1) * opt.state[p]["lam"] * p).sum()
                 + h.c * h.alpha / 2 * ((p - opt.state[p]["w_bar"]) ** 2).sum() for p in ps)
    assert opt.regularizer().item() == pytest.approx(expect.item(), rel=1e-5)
    assert opt.regularizer().item() != 0.0


def _quadratic(d, a):
    return lambda w: d * (w - a)  # gradient of sum(d/2 * (w - a)^2)


def test_exact_minimiser_ties_to_the_paper(fresh_seed):
    """docs/ALGORITHM.md's tie to the paper, with an exactly minimised quadratic loss.

    With rho = 0 and c = 1 (the authors' code) the stationarity of step 2's objective,
    grad l(w) - lam + alpha (w - w_bar) = 0, makes the new lam (step 5) equal to
    grad l(w_new); with beta = 1/2, step 6 then is the paper's closed form
    W_bar' = (W_bar + W') / 2 - grad l(W') / (2 alpha)."""
    n, alpha = 50, 0.7
    h = Hyper(alpha=alpha, beta=0.5, rho=0.0, c=1.0)
    w_bar, lam = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    for _ in range(20):
        d, a = torch.rand(n, dtype=torch.float64) + 0.5, torch.randn(n, dtype=torch.float64)
        grad_l = _quadratic(d, a)
        # argmin_w sum(d/2 (w-a)^2) + (rho-1) lam.w + (c alpha/2)|w - w_bar|^2
        w = (d * a - (h.rho - 1) * lam + h.c * alpha * w_bar) / (d + h.c * alpha)
        assert torch.allclose(grad_l(w) + reference.regularizer_grad(w, w_bar, lam, h),
                              torch.zeros(n, dtype=torch.float64), atol=1e-12)
        old_w_bar = w_bar.clone()
        reference.dual_average_(w, w_bar, lam, h)
        assert torch.allclose(lam, grad_l(w), atol=1e-12)
        paper = 0.5 * (old_w_bar + w) - grad_l(w) / (2 * alpha)
        assert torch.allclose(w_bar, paper, atol=1e-12)


def test_rho_half_is_the_papers_instantaneous_risk(fresh_seed):
    """With rho = 1/2 and c = 1 the regulariser equals the paper's
    (alpha/2)|W - W_bar - lam/(2 alpha)|^2 up to a constant in W: same gradient,
    and the difference of values does not depend on W."""
    alpha = 0.8
    h = Hyper(alpha=alpha, rho=0.5, c=1.0)
    w_bar, lam = torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    paper = lambda w: alpha / 2 * ((w - w_bar - lam / (2 * alpha)) ** 2).sum()  # noqa: E731
    diffs = []
    for _ in range(5):
        w = torch.randn(30, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(paper(w), w)
        assert torch.allclose(reference.regularizer_grad(w.detach(), w_bar, lam, h), g, atol=1e-12)
        diffs.append((reference.regularizer_value(w, w_bar, lam, h) - paper(w)).item())
    assert max(diffs) - min(diffs) < 1e-10


# --- the LSTM -----------------------------------------------------------------

@pytest.mark.parametrize("I,H,B,T", [(3, 5, 4, 7), (1, 17, 1, 1), (6, 9, 3, 12)])
def test_reference_lstm_matches_nn_lstm(I, H, B, T, fresh_seed):
    ref = reference.ReferenceLSTM(I, H, dtype=torch.float64)
    lstm = torch.nn.LSTM(I, H, dtype=torch.float64)
    ref.load_state_dict(lstm.state_dict())  # nn.LSTM's state_dict loads as is
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    out_n, (h_n, c_n) = lstm(x, (h0[None], c0[None]))
    assert torch.allclose(out_r, out_n, atol=1e-12)
    assert torch.allclose(h_r, h_n[0], atol=1e-12) and torch.allclose(c_r, c_n[0], atol=1e-12)
    w = torch.randn_like(out_r)
    g_r = torch.autograd.grad((out_r * w).sum() + c_r.sum(), list(ref.parameters()))
    g_n = torch.autograd.grad((out_n * w).sum() + c_n.sum(), list(lstm.parameters()))
    for a, b in zip(g_r, g_n):
        assert torch.allclose(a, b, atol=1e-10)


def test_segment_bounds():
    assert reference.segment_bounds(10, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert reference.segment_bounds(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    for T, K in [(10, 6), (5, 6), (0, 1), (4, 0)]:
        with pytest.raises(ValueError):
            reference.segment_bounds(T, K)


@pytest.mark.parametrize("weights,weight_of", [("ramp", lambda p: (p + 1) / 4),
                                               ("authors", lambda p: p + 1 / 4)])
def test_fptt_segment_loop_weights_and_detach(weights, weight_of, fresh_seed):
    """train_sequence_fptt: one update per segment, segment p's terminal loss weighted
    (p+1)/K (ramp) or p + 1/K (the authors'), state detached: update p's gradient equals
    the gradient of the weighted loss of segment p alone."""
    torch.manual_seed(fresh_seed)
    model = reference.LSTMWithHead(2, 6, 1, dtype=torch.float64)
    x, y = torch.randn(8, 3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    grads = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            grads.append([p.grad.clone() for p in model.parameters()])

    opt = Spy(model.parameters(), lr=0.0)
    losses = reference.train_sequence_fptt(model, opt, x, y, K=4, weights=weights)
    assert len(losses) == len(grads) == 4
    for p_idx, (a, b) in enumerate(reference.segment_bounds(8, 4)):
        # rebuild segment p's entering state by running the earlier segments
        with torch.no_grad():
            _, st = model.lstm(x[:a]) if a else (None, None)
        loss, _ = reference.segment_loss(model, x[a:b], y, st, "mse", False)
        expect = torch.autograd.grad(weight_of(p_idx) * loss, list(model.parameters()))
        for e, g in zip(expect, grads[p_idx]):
            assert torch.allclose(e, g, atol=1e-12)


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(alpha=-1.0), "alpha"), (dict(beta=0.0), "beta"),
    (dict(beta=1.5), "beta"), (dict(clip=-1.0), "clip"), (dict(lr=float("nan")), "lr"),
    (dict(optimizer="rmsprop"), "optimizer"), (dict(nonfinite="ignore"), "nonfinite"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(nesterov=True, optimizer="adam"), "nesterov"),
    (dict(c=-1.0), "c"),
])
def test_bad_hyper_parameters_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        fptt_fast.FPTT([torch.randn(3, requires_grad=True)], backend="reference", **kw)


def test_bad_parameters_raise():
    with pytest.raises(TypeError, match="float32 or float64"):
        fptt_fast.FPTT([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="contiguous"):
        fptt_fast.FPTT([torch.randn(4, 3).t().requires_grad_()])


def _trained_opt(seed):
    torch.manual_seed(seed)
    ps = [torch.randn(4, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = fptt_fast.FPTT(ps, backend="reference", clip=1.0)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("breaker,field", [
    (lambda sd: sd["state"][1].pop("lam"), "lam"),
    (lambda sd: sd["state"].pop(0), "parameter 0"),
    (lambda sd: sd["state"][0].__setitem__("w_bar", torch.zeros(3, 4)), "w_bar"),
    (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(8)), "exp_avg"),
    (lambda sd: sd.pop("fptt"), "fptt"),
    (lambda sd: sd["param_groups"][0].pop("alpha"), "alpha"),
    (lambda sd: sd["param_groups"][0].__setitem__("beta", 2.0), "beta"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "params"),
])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(breaker, field, fresh_seed):
    _, src = _trained_opt(fresh_seed)
    sd = src.state_dict()
    breaker(sd)
    ps, opt = _trained_opt(fresh_seed + 1)
    before = {n: t.clone() for n, t in opt.flat_state.items()}
    groups_before = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(ValueError, match=field):
        opt.load_state_dict(sd)
    for n, t in opt.flat_state.items():
        assert torch.equal(t, before[n])
    assert [dict(g, params=None) for g in opt.param_groups] == groups_before


def test_nonfinite_raise_and_skip_change_nothing(fresh_seed):
    for mode in ("raise", "skip"):
        ps, opt = _trained_opt(fresh_seed)
        opt.nonfinite = mode
        before = [p.detach().clone() for p in ps] + [t.clone() for t in opt.flat_state.values()]
        ps[1].grad[3] = float("nan")
        if mode == "raise":
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        after = [p.detach() for p in ps] + list(opt.flat_state.values())
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fused_lstm_forward_matches_the_loop():
    """reference.fused_lstm_forward (torch's fused LSTM, the CLI's BPTT baseline on a GPU)
    computes ReferenceLSTM's function: outputs, state and parameter gradients."""
    torch.manual_seed(3)
    m = reference.ReferenceLSTM(3, 5)
    x = torch.randn(9, 4, 3)
    st = (torch.randn(4, 5), torch.randn(4, 5))
    o1, (h1, c1) = m(x, st)
    o2, (h2, c2) = reference.fused_lstm_forward(m, x, st)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    w = torch.randn_like(o1)
    g1 = torch.autograd.grad((o1 * w).sum(), list(m.parameters()))
    g2 = torch.autograd.grad((o2 * w).sum(), list(m.parameters()))
    scale = max(float(g.abs().max()) for g in g1)
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) <= 1e-5 * scale
