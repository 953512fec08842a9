"""The one test harness: where each backend runs, the tolerances, and the fused-versus-
reference pairs of the FPTT optimiser and of FPTTLSTM that every test file uses.

Devices: `reference` and `cpu` run CPU tensors; `triton` runs CUDA tensors, compiled, when
torch sees a GPU, and CPU tensors through Triton's interpreter otherwise (one program;
tests/conftest.py sets TRITON_INTERPRET=1 only then); `cuda` needs a GPU and an extension
built with CUDA, and is skipped, with the reason, elsewhere.

The project's tolerances, as max |difference| / max |w| unless said otherwise:
    TOL_UPDATE  2e-5  fp32 element-wise update over 20+ steps (w, w_bar, lam, buffers)
    TOL_MATMUL  1e-4  through matmuls and reductions (LSTM segments, gradients, norms)
    TOL_NORM    1e-5  the update's global gradient norm, relative
    TOL_STATE   1e-5  h, c after a segment, absolute (c: relative to max(1, max|c|),
                      capped so that it is never looser than TOL_MATMUL absolute)
    TOL_TF32    5e-3  TF32 matmuls against IEEE fp32 (assert_tf32_close), with SGD
"""
import contextlib
import dataclasses
import functools
import inspect
import os

import pytest
import torch

import fptt_fast
from fptt_fast import reference
from fptt_fast.lstm import LSTM_KEYS, PARAM_NAMES
from fptt_fast.optim import STATUS_LAST_SKIPPED

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FUSED = ("cpu", "triton", "cuda")

TOL_UPDATE = 2e-5
TOL_MATMUL = 1e-4
TOL_NORM = 1e-5
TOL_STATE = 1e-5
TOL_TF32 = 5e-3
NAN = float("nan")


def scaled_err(a, b, scale):
    """max |a - b| / scale: errors measured against the parameters' scale (max |w|),
    since lam and w - w_bar are differences of nearby numbers."""
    return (a.detach().double() - b.detach().double()).abs().max().item() / scale


# ------------------------------------------------------------------------------------
# Where each backend runs
# ------------------------------------------------------------------------------------

def triton_compiled():
    """Triton compiles for the GPU (else it interprets CPU tensors)."""
    return HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"


def device_of(backend):
    """The device a backend's tests put their tensors on."""
    if backend == "cuda" or (backend == "triton" and triton_compiled()):
        return "cuda"
    return "cpu"


def interpreted(backend):
    """True where the backend runs through Triton's interpreter (slow: smaller cases)."""
    return backend == "triton" and device_of(backend) == "cpu"


def backend_device(backend, what="update"):
    """The device for `backend`'s tests of `what` ("update": FPTT, "lstm": FPTTLSTM's
    segment step). Skips `cuda` where it cannot run, saying why; reference, cpu and triton
    must run on every test machine, so their unavailability fails the test."""
    dev = device_of(backend)
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda backend: needs a GPU (torch.cuda.is_available() is False)")
    try:  # the public constructors say why a backend cannot run, as a user sees it
        if what == "lstm":
            fptt_fast.FPTTLSTM(1, 1, 1, backend=backend, device=dev)
        else:
            fptt_fast.FPTT([torch.ones(1, device=dev)], backend=backend)
    except RuntimeError as e:
        if backend == "cuda":
            pytest.skip(f"cuda backend unavailable: {e}")
        raise
    return dev


def with_grid_limit(monkeypatch, module, name, limit):
    """Cap the Triton grid of module.name (looked up at call time) for this test."""
    monkeypatch.setattr(module, name, functools.partial(getattr(module, name), grid_limit=limit))


def capture_step(opt):
    """torch's recipe for a CUDA graph: one warm-up opt.step() on a side stream (compiles,
    builds the cached tables), then opt.step() captured. Returns the graph; the warm-up
    step has been taken, the captured one not yet."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


# ------------------------------------------------------------------------------------
# The FPTT optimiser: a fused backend and the reference on the same parameters
# ------------------------------------------------------------------------------------

# Sizes multiples of no block or chunk (cuda and compiled Triton: 4096; the interpreter:
# 2048), a one-element tensor (it shifts every later state view off 16-byte alignment),
# tensors spanning several chunks, and parameter NONE_GRAD whose grad stays None. On a
# GPU one tensor of 1.1 M elements gives the Triton grid many programs and its barrier.
SHAPES_CPU = [(37, 29), (1,), (2500,), (5, 7, 11), (13,), (300,)]
SHAPES_GPU = [(37, 29), (1,), (9000,), (5, 7, 11), (13,), (4097,), (300,), (1100, 1013)]
NONE_GRAD = 4
SPLIT = 3  # params[:SPLIT] in group 0, the rest in group 1 (other lr, alpha, beta)


def shapes_for(device):
    return SHAPES_GPU if device == "cuda" else SHAPES_CPU


def two_groups(lr):
    """Options of group 1: it differs in lr, alpha and beta (the kernels must read each
    tensor's own hyper-parameter row)."""
    return {"lr": lr * 0.3, "alpha": 0.3, "beta": 0.7}


def make_pair(backend, shapes, *, device="cpu", split=None, group1=None, random_state=False,
              **kw):
    """The same random parameters under `backend` (pa, oa) and the reference (pb, ob).

    shapes: shapes, or tensors used as they are for `backend` (a misaligned view, say).
    split, group1: params[:split] form group 0, the rest group 1 with options group1.
    random_state: start both from the same random w_bar and lam (as after some training),
    so the regulariser weighs in the gradient, its norm and the update from the first step.
    """
    pa = [s if isinstance(s, torch.Tensor) else torch.randn(s, device=device) for s in shapes]
    pb = [p.clone() for p in pa]

    def groups(ps):
        return ps if split is None else [{"params": ps[:split]}, {"params": ps[split:], **group1}]

    oa = fptt_fast.FPTT(groups(pa), backend=backend, **kw)
    ob = fptt_fast.FPTT(groups(pb), backend="reference", **kw)
    assert oa.backend == backend and ob.backend == "reference"
    if random_state:
        for a, b in zip(pa, pb):
            w_bar, lam = a + 0.3 * torch.randn_like(a), 0.3 * torch.randn_like(a)
            for o, p in ((oa, a), (ob, b)):
                o.state[p]["w_bar"].copy_(w_bar)
                o.state[p]["lam"].copy_(lam)
    return pa, pb, oa, ob


def draw_grads(params, none_idx=None):
    """Fresh random gradients; None for parameter none_idx."""
    return [None if i == none_idx else torch.randn(p.shape, device=p.device)
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


# The floor of the scale errors are measured against: the state (Adam's moments, lam)
# follows the unit-scale random gradients, not w, and a lone parameter drawn at 5e-4
# made a 1.5e-8 rounding difference in exp_avg look like 3e-5 (2 seeds in 201).
SCALE_FLOOR = 0.1


def compare(pa, pb, oa, ob, tol=TOL_UPDATE):
    """Every tensor within tol (scaled by max |w|, at least SCALE_FLOOR); the same state
    fields; step counts exactly equal."""
    scale = max([SCALE_FLOOR] + [p.abs().max().item() for p in pb if p.numel()])
    for i, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb)
        if a.numel():
            err = scaled_err(a, b, scale)
            assert err <= tol, f"param {i} ({tuple(a.shape)}): w error {err:.3g}"
        for name in sa:
            if name == "step":
                assert sa[name].item() == sb[name].item(), f"param {i}: step {sa[name]} vs {sb[name]}"
            elif a.numel():
                err = scaled_err(sa[name], sb[name], scale)
                assert err <= tol, f"param {i} ({tuple(a.shape)}): {name} error {err:.3g}"


def assert_norm_close(oa, ob):
    """The fused step's global norm: finite and within TOL_NORM of the reference's."""
    na, nb = oa.last_norm.item(), ob.last_norm.item()
    assert abs(na - nb) <= TOL_NORM * nb, (na, nb)


def step_pair(pa, pb, oa, ob, grads, reuse=True):
    set_grads(pa, grads, reuse)
    set_grads(pb, grads, reuse)
    oa.step()
    ob.step()


def run_steps(pa, pb, oa, ob, n, none_idx=None, tol=TOL_UPDATE):
    """n steps on the same fresh gradients; everything compared after each."""
    for _ in range(n):
        step_pair(pa, pb, oa, ob, draw_grads(pa, none_idx))
        compare(pa, pb, oa, ob, tol)
        assert_norm_close(oa, ob)


def snapshot(params, opt, flat=True):
    """Copies of w, of each parameter's state and (flat=True) of the flat state buffers."""
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
            {k: v.clone() for k, v in opt.flat_state.items()} if flat else None)


def assert_unchanged(params, opt, snap):
    """Bitwise: w, every state field of every parameter, the flat buffers (if taken)."""
    ws, states, flat = snap
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), ws[i]), f"param {i} changed"
        for k, v in opt.state[p].items():
            assert torch.equal(v, states[i][k]), f"param {i}: {k} changed"
    for k, v in (flat or {}).items():
        assert torch.equal(opt.flat_state[k], v), f"flat {k} changed"


def assert_bitwise_equal(pa, pb, oa, ob):
    """Two optimisers over two parameter lists hold bitwise the same values."""
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i} differs"
        assert set(oa.state[a]) == set(ob.state[b])
        for name in oa.state[a]:
            assert torch.equal(oa.state[a][name], ob.state[b][name]), f"param {i}: {name} differs"
    # status [norm, last skipped, skipped count]; the norm of a skipped step is NaN/inf
    torch.testing.assert_close(oa._status, ob._status, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------
# FPTTLSTM: a fused segment step and the reference on the same weights
# ------------------------------------------------------------------------------------

# Adam's step lr * m / (sqrt(v) + eps) divides by the gradient's own scale, and FPTT drives
# the regularised gradient g + (rho - 1) lam + c alpha (w - w_bar) towards 0 (lam tracks
# the task gradient). Elements near 0 then carry only fp32 rounding noise (the fused
# kernels and autograd sum in different orders), which Adam with eps = 1e-8 turns into
# steps of ~lr: differences of ~1e-4 of max|w| that are noise, not a bug (the same runs
# with SGD agree to ~1e-7). A larger eps bounds that amplification by lr * noise / eps.
ADAM_EPS = 1e-4
LSTM_OPT = {
    "adam": dict(optimizer="adam", lr=2e-3, clip=1.0, eps=ADAM_EPS),
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, clip=0.5, rho=0.5, c=2.0,
                weight_decay=1e-3),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, alpha=0.3, beta=0.7, clip=None,
                  eps=ADAM_EPS),
}
# The cuda kernel is also held to Adam's default eps with larger steps (stricter).
LSTM_OPT_STRICT = {
    "adam": dict(optimizer="adam", lr=1e-2, clip=1.0),
    "adamw": dict(optimizer="adamw", lr=5e-3, weight_decay=0.1, alpha=0.3, beta=0.7, clip=None),
}
# LSTMPair settings of the kernel cases: Adam's default eps, a random FPTT state (the
# regulariser weighs in from the first segment and Adam is not fed near-zero gradients),
# rho and c away from their defaults, inf/NaN steps skipped.
LSTM_KERNEL_KW = dict(lr=1e-2, rho=0.5, c=2.0, nonfinite="skip", fptt_state=0.1)


def fptt_weights(n, per_step):
    """FPTT's segment weights: 1 per step, (k + 1) / K for a terminal target."""
    return [1.0] * n if per_step else [(k + 1) / n for k in range(n)]


def lstm_opts(name, backend):
    """The optimiser settings `backend` is checked with for base optimiser `name`."""
    out = [LSTM_OPT[name]]
    if backend == "cuda" and name in LSTM_OPT_STRICT:
        out.append(LSTM_OPT_STRICT[name])
    return out


def make_target(loss, per_step, omega, B, O, device="cpu"):
    lead = (omega, B) if per_step else (B,)
    if loss == "mse":
        return torch.randn(*lead, O, device=device)
    return torch.randint(0, O, lead, device=device)


def reference_model(m):
    """reference.LSTMWithHead holding FPTTLSTM m's weights."""
    model = reference.LSTMWithHead(m.input_size, m.hidden_size, m.output_size,
                                   device=m.weight_hh_l0.device)
    sd = m.lstm_state_dict()
    model.load_state_dict({("lstm." + k if k in LSTM_KEYS else k): v for k, v in sd.items()})
    return model


def reference_params(model):
    """LSTMWithHead's parameters in FPTTLSTM's order (PARAM_NAMES)."""
    return [model.lstm.weight_ih_l0, model.lstm.weight_hh_l0, model.lstm.bias_ih_l0,
            model.lstm.bias_hh_l0, model.head.weight, model.head.bias]


@contextlib.contextmanager
def poisoned_allocations():
    """Every float tensor made by torch.empty / torch.empty_like inside starts as NaN, so
    an output buffer (h, c, loss) that a kernel fails to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(NAN) if t.is_floating_point() and t.numel() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def segment_grads(m):
    """The task gradients (of weight * loss) the fused segment step of m wrote last."""
    return m._grads


class LSTMPair:
    """FPTTLSTM(backend) and the reference: reference.LSTMWithHead with the same weights,
    reference.segment_loss + autograd for the gradients of weight * loss, and
    FPTT(backend="reference") for the update. `fptt_state` > 0 starts both from the same
    random w_bar = w + fptt_state * randn, lam = fptt_state * randn."""

    def __init__(self, backend, I, H, O, *, loss="mse", per_step=False, device="cpu",
                 fptt_state=0.0, check_inputs=None, **opt_kw):
        self.m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend,
                                    device=device, check_inputs=check_inputs, **opt_kw)
        assert self.m.backend == backend
        self.model = reference_model(self.m)
        self.params = reference_params(self.model)
        self.opt = fptt_fast.FPTT(self.params, backend="reference", **opt_kw)
        self.I, self.H, self.O, self.device = I, H, O, device
        self.loss, self.per_step = loss, per_step
        if fptt_state:
            for a, b in zip(self.m.fptt_parameters(), self.params):
                w_bar = a.detach() + fptt_state * torch.randn_like(a)
                lam = fptt_state * torch.randn_like(a)
                for o, p in ((self.m.optimizer, a), (self.opt, b)):
                    o.state[p]["w_bar"].copy_(w_bar)
                    o.state[p]["lam"].copy_(lam)

    def draw(self, omega, B):
        return (torch.randn(omega, B, self.I, device=self.device),
                make_target(self.loss, self.per_step, omega, B, self.O, self.device))

    def fused(self, x, y, state, weight):
        """One fused segment step, its outputs poisoned first; (loss, (h, c), grads)."""
        if segment_grads(self.m) is not None:
            for g in segment_grads(self.m):
                g.fill_(NAN)
        with poisoned_allocations():
            loss, state = self.m.train_segment(x, y, state, weight=weight)
        return loss, state, [g.clone() for g in segment_grads(self.m)]

    def ref(self, x, y, state, weight):
        if state is None:
            z = torch.zeros(x.shape[1], self.H, device=self.device)
            state = (z, z.clone())
        seg_loss, (h, c) = reference.segment_loss(self.model, x, y, state, self.loss,
                                                  self.per_step)
        grads = torch.autograd.grad(weight * seg_loss, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt.step()
        return seg_loss.detach(), (h.detach(), c.detach()), list(grads)

    def compare_params(self, tol=TOL_MATMUL):
        """w and every FPTT state field within tol of max |w|; step counts equal."""
        scale = max(p.abs().max().item() for p in self.params)
        for name, a, b in zip(PARAM_NAMES, self.m.fptt_parameters(), self.params):
            assert scaled_err(a, b, scale) <= tol, f"{name}: w"
            sa, sb = self.m.optimizer.state[a], self.opt.state[b]
            assert set(sa) == set(sb)
            for field in sb:
                if field == "step":
                    assert sa[field].item() == sb[field].item(), (name, sa[field], sb[field])
                else:
                    assert scaled_err(sa[field], sb[field], scale) <= tol, f"{name}: {field}"

    def segment(self, x, y, s_f, s_r, weight, state_tol=TOL_STATE, tag=""):
        """One segment on both sides, each from its own carried state; everything
        compared. Returns the two new states."""
        l_f, s_f, g_f = self.fused(x, y, s_f, weight)
        l_r, s_r, g_r = self.ref(x, y, s_r, weight)
        assert abs(l_f.item() - l_r.item()) <= TOL_MATMUL * max(1.0, abs(l_r.item())), \
            (tag, l_f.item(), l_r.item())
        assert scaled_err(s_f[0], s_r[0], 1.0) <= state_tol, tag + " h"
        c_scale = min(TOL_MATMUL / state_tol, max(1.0, s_r[1].abs().max().item()))
        assert scaled_err(s_f[1], s_r[1], c_scale) <= state_tol, tag + " c"
        # Each gradient against its own scale, floored at 1 % of the largest gradient and at
        # 1e-2 (so 1e-6 absolute: the fp32 rounding of a few terms of size ~1, the size of
        # the loss gradients dL/dpred here, is ~1e-7): a tensor whose batch contributions
        # nearly cancel (a head bias under CE with few rows; at H = 1, MSE, B = 3, seed 26:
        # head weight 8.3e-5 with an error of 6e-8, head bias an error of 1.2e-7) is small
        # while its rounding error scales with the contributions. Against its own max alone it failed ~1 seed in
        # 25 in the interpreter; two GPU cases (cuda, random shapes) failed on
        # 2026-11-27 with the reason cut from the log.
        g_scale = max(b.abs().max().item() for b in g_r)
        for name, a, b in zip(PARAM_NAMES, g_f, g_r):
            err = scaled_err(a, b, max(b.abs().max().item(), 0.01 * g_scale, 1e-2))
            assert err <= TOL_MATMUL, f"{tag} grad {name}: error {err:.3g}"
        self.compare_params()
        assert self.m.optimizer._status[STATUS_LAST_SKIPPED].item() == 0.0, tag
        n_f, n_r = self.m.optimizer.last_norm.item(), self.opt.last_norm.item()
        assert abs(n_f - n_r) <= TOL_MATMUL * n_r, (tag, n_f, n_r)
        return s_f, s_r

    def run(self, B, omegas, weights=None, state_scale=0.0, state_tol=TOL_STATE):
        """Segments of lengths `omegas`, (h, c) carried on each side, compared after each;
        weights: one per segment, or None for a random pick of 1, 0.3 or (k + 1) / K."""
        s_f = s_r = None
        if state_scale:
            s_f = tuple(torch.randn(B, self.H, device=self.device) * state_scale for _ in "hc")
            s_r = tuple(t.clone() for t in s_f)
        for k, omega in enumerate(omegas):
            choices = (1.0, 0.3, (k + 1) / len(omegas))
            w = choices[int(torch.randint(3, ()))] if weights is None else weights[k]
            x, y = self.draw(omega, B)
            s_f, s_r = self.segment(x, y, s_f, s_r, w, state_tol,
                                    f"segment {k} (omega={omega}, B={B}, H={self.H}, w={w})")
        steps = {int(self.m.optimizer.state[p]["step"]) for p in self.m.fptt_parameters()}
        assert steps == {len(omegas)}, steps


def lstm_run_bits(backend, device, seed, sizes, opt_kw, n_seg=4, loss="ce", per_step=True,
                  **kw):
    """Everything n_seg segments of FPTTLSTM(backend) produce, for bitwise comparisons:
    each segment's loss, (h, c) and gradients, then w, all FPTT state and the status."""
    I, H, O, B, T = sizes
    torch.manual_seed(seed)
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend,
                           device=device, **opt_kw, **kw)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    lead = (T, B) if per_step else (B,)
    state, outs = None, []
    for _ in range(n_seg):
        x = torch.randn(T, B, I, device=device, generator=gen)
        y = (torch.randn(*lead, O, device=device, generator=gen) if loss == "mse"
             else torch.randint(0, O, lead, device=device, generator=gen))
        loss_k, state = m.train_segment(x, y, state, weight=0.5)
        outs += [loss_k.clone(), *state, *[g.clone() for g in segment_grads(m)]]
    st = m.optimizer.state
    return (outs + [p.detach().clone() for p in m.fptt_parameters()]
            + [st[p][f].clone() for p in m.fptt_parameters() for f in sorted(st[p])]
            + [m.optimizer._status.clone()])


def assert_tf32_close(a, b, n_run):
    """A run with TF32 matmuls (b) against the same run in IEEE fp32 (a), outputs laid out
    as lstm_run_bits': the run's own outputs first (losses, h, c, gradients: n_run of
    them), then the six parameters, their FPTT state, and the status last. Each run output
    within TOL_TF32 of its own max |.| (floored at 1e-2), w and the state within TOL_TF32 of
    max |w| (DEVELOPERS.md), the status's norm within TOL_TF32 relative, its skip flags
    equal. Use SGD: Adam's first steps move each weight by about lr whatever the size of
    its gradient, so where a gradient is near zero TF32's rounding flips the step (a CPU
    emulation of TF32 gave state errors of 1-3e-2 of max|w| with Adam, 2e-5 with SGD)."""
    assert len(a) == len(b)
    w_scale = max(t.abs().max().item() for t in a[n_run:n_run + 6])
    for i, (u, v) in enumerate(zip(a[:-1], b[:-1])):
        scale = max(u.abs().max().item(), 1e-2) if i < n_run else w_scale
        err = scaled_err(u, v, scale)
        assert err <= TOL_TF32, f"output {i}: TF32 off by {err:.3g} of {scale:.3g}"
    st, st32 = b[-1], a[-1]
    assert st[1:].tolist() == st32[1:].tolist(), (st, st32)
    err = abs(st[0].item() - st32[0].item()) / max(abs(st32[0].item()), 1e-2)
    assert err <= TOL_TF32, f"status norm: TF32 off by {err:.3g} relative"


def assert_all_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs"


def with_fields(bound, **changed):
    """A launcher's bound (state, segment, config) arguments (bind_args of a seam launcher)
    with fields changed by name, wherever they live: FpttState, SegmentIO or SegmentConfig
    (copies; the originals are left as they are)."""
    out = {}
    for key in ("state", "segment", "config"):
        obj = bound[key]
        names = {f.name for f in dataclasses.fields(obj)}
        out[key] = dataclasses.replace(obj, **{k: v for k, v in changed.items() if k in names})
    unknown = set(changed) - {f.name for o in out.values() for f in dataclasses.fields(o)}
    assert not unknown, f"no such seam field: {sorted(unknown)}"
    return {**bound, **out}


def bind_args(fn, args, kwargs):
    """fn's arguments by name (robust to a reordering of its positional arguments)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return dict(bound.arguments)


def sm90_compile_script(module, kernel, consts, ptr_kinds, scalar_kinds, num_warps):
    """Python source compiling fptt_fast.kernels.<module>.<kernel> ahead of time for sm_90
    (no GPU needed) and printing "SHARED <bytes> CUBIN <bytes>". consts and num_warps are
    source expressions evaluated there with the module imported as `mod`; pointers are
    *fp32 unless ptr_kinds says otherwise, scalars i32 unless scalar_kinds does."""
    return f"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fptt_fast.kernels import {module} as mod
fn = mod.{kernel}
const = {consts}
sig = {{n: "constexpr" if n in const
        else {ptr_kinds!r}.get(n, "*fp32") if n.endswith("_ptr")
        else {scalar_kinds!r}.get(n, "i32") for n in fn.arg_names}}
k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps={num_warps}))
print("SHARED", k.metadata.shared, "CUBIN", len(k.asm.get("cubin", b"")))
"""


def start_background_compile(registry, script, prefix):
    """Run `script` (Python source) in a subprocess, once per registry dict: the ahead-of-time
    Triton compiles for sm_90 (test_lstm_triton*.py), started by tests/conftest.py as soon
    as the tests are chosen so that their seconds of one core overlap the other tests.
    TRITON_INTERPRET is dropped (a real compile) and the Triton cache is private."""
    import atexit
    import subprocess
    import sys
    import tempfile
    if "proc" not in registry:
        work = tempfile.mkdtemp(prefix=prefix)
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(work, "cache"))
        env.pop("TRITON_INTERPRET", None)
        out, err = (open(os.path.join(work, n), "w+") for n in ("out", "err"))
        registry.update(work=work, out=out, err=err, proc=subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=out, stderr=err, text=True))
        atexit.register(registry["proc"].kill)  # if the test never collects it
    return registry


def finish_background_compile(job):
    """Wait for a start_background_compile job and return its stdout; skips when this
    triton install has no CUDA toolchain, fails on any other error."""
    import shutil
    try:
        returncode = job["proc"].wait(timeout=600)
        job["out"].seek(0)
        job["err"].seek(0)
        stdout, stderr = job["out"].read(), job["err"].read()
    finally:
        job["out"].close()
        job["err"].close()
        shutil.rmtree(job["work"], ignore_errors=True)
    if returncode != 0 and ("ptxas" in stderr.lower() or "backend" in stderr.lower()
                            and "not found" in stderr.lower()):
        pytest.skip("no CUDA compiler toolchain in this triton install")
    assert returncode == 0, stderr[-3000:]
    return stdout
