"""fptt_fast.FPTTLSTM: the fused segment step against fptt_fast.reference.

Every backend that can run here is compared, segment after segment, with the reference
(ReferenceLSTM math + autograd + FPTT(backend="reference")): losses, carried state,
parameters and the FPTT state (w_bar, lam). Tolerance: max |diff| / max |w| <= 1e-4
(fp32 through matmuls). Inputs are drawn fresh for each run (fresh_seed is printed on
failure). cpu runs everywhere; triton runs on CPU tensors through Triton's interpreter
(small shapes) without a GPU, on CUDA tensors with one; cuda needs a GPU and the
extension's lstm_segment_step_cuda (skipped otherwise).
"""
import os
import random
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn

import fptt_fast
from fptt_fast import reference
from fptt_fast.lstm import (LSTM_KEYS, PARAM_NAMES, _cpu_segment_reason, _cuda_segment_reason,
                            _triton_segment_reason)

from .utils import scaled_err

TOL = 1e-4
# Adam's step lr * m / (sqrt(v) + eps) divides by the gradient's own scale, and FPTT drives
# the regularised gradient g + (rho - 1) lam + c alpha (w - w_bar) towards 0 (lam tracks
# the task gradient, FPTT.md). Elements near 0 then carry only fp32 rounding noise (the
# fused kernels and autograd sum in different orders), which Adam with eps = 1e-8 turns
# into steps of ~lr: differences of ~1e-4 of max|w| that are noise, not a bug (the same
# runs with SGD agree to ~1e-7). A larger eps bounds that amplification by lr * noise / eps.
ADAM_EPS = 1e-4
OPT = [
    dict(optimizer="adam", lr=2e-3, clip=1.0, eps=ADAM_EPS),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, clip=0.5, rho=0.5, c=2.0, weight_decay=1e-3),
    dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, alpha=0.3, beta=0.7, clip=None,
         eps=ADAM_EPS),
]


def _need_cpu():
    reason = _cpu_segment_reason()
    assert reason is None, reason  # the C++ extension is built on every test machine


FUSED = ["cpu", "triton", "cuda"]


def _require(backend):
    """The device the backend's tests run on; skips cuda where it cannot run."""
    if backend == "reference":
        return "cpu"
    if backend == "cpu":
        _need_cpu()
        return "cpu"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "triton":
        reason = _triton_segment_reason(dev)
        assert reason is None, reason  # interpreter on CPU, compiled on a GPU
        return dev
    reason = _cuda_segment_reason("cuda" if torch.cuda.is_available() else "cpu")
    if reason is not None:
        pytest.skip(f"cuda segment step: {reason}")
    return "cuda"


def _small(backend, dev):
    """The Triton interpreter is slow: smaller cases for it."""
    return backend == "triton" and dev == "cpu"


def make_target(loss, per_step, omega, B, O, dev="cpu"):
    lead = (omega, B) if per_step else (B,)
    if loss == "mse":
        return torch.randn(*lead, O, device=dev)
    return torch.randint(0, O, lead, device=dev)


def make_pair(backend, I, H, O, loss, per_step, dev="cpu", **kw):
    ref = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend="reference",
                             device=dev, **kw)
    fused = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend,
                               device=dev, **kw)
    fused.load_lstm_state_dict(ref.lstm_state_dict())
    assert fused.backend == backend and ref.backend == "reference"
    return fused, ref


def compare_modules(a, b, what=""):
    scale = max(p.abs().max().item() for p in b.fptt_parameters())
    for name, p, q in zip(PARAM_NAMES, a.fptt_parameters(), b.fptt_parameters()):
        assert scaled_err(p, q, scale) <= TOL, f"{what} {name}"
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        for field in ("w_bar", "lam"):
            assert scaled_err(sa[field], sb[field], scale) <= TOL, f"{what} {name} {field}"


def run_segments(backend, I, H, O, B, omegas, loss, per_step, opt_kw, builtin_gemm=False,
                 dev="cpu"):
    fused, ref = make_pair(backend, I, H, O, loss, per_step, dev=dev, **opt_kw)
    fused.cpu_builtin_gemm = builtin_gemm
    s_f = s_r = None
    for k, omega in enumerate(omegas):
        x = torch.randn(omega, B, I, device=dev)
        y = make_target(loss, per_step, omega, B, O, dev)
        w = random.choice([1.0, 0.3, (k + 1) / len(omegas)])
        l_f, s_f = fused.train_segment(x, y, s_f, weight=w)
        l_r, s_r = ref.train_segment(x, y, s_r, weight=w)
        tag = f"segment {k} (omega={omega})"
        assert abs(l_f.item() - l_r.item()) <= TOL * max(1.0, abs(l_r.item())), tag
        for u, v in zip(s_f, s_r):
            assert scaled_err(u, v, 1.0) <= TOL, tag + " state"
        compare_modules(fused, ref, tag)
    assert int(fused.optimizer.state[fused.weight_hh_l0]["step"]) == len(omegas)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True])
def test_random_shapes_ten_segments(backend, loss, per_step, fresh_seed):
    dev = _require(backend)
    small = _small(backend, dev)
    rng = random.Random(fresh_seed)
    random.seed(fresh_seed)
    for trial in range(1 if small else 2):
        I = rng.choice([1, 3, 5, 6])
        H = rng.choice([3, 7, 13] if small else [3, 7, 13, 24, 100])  # not powers of two
        O = rng.choice([1, 2, 5])
        B = rng.choice([1, 2, 9] if small else [1, 2, 9, 33])
        omegas = [rng.randint(1, 4 if small else 9) for _ in range(10)]
        run_segments(backend, I, H, O, B, omegas, loss, per_step, OPT[(trial + fresh_seed) % 3],
                     builtin_gemm=bool(trial), dev=dev)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", ["B=1", "omega=1", "omega=200", "wide"])
def test_edge_shapes(backend, case, fresh_seed):
    dev = _require(backend)
    small = _small(backend, dev)
    random.seed(fresh_seed)
    if case == "B=1":
        run_segments(backend, 4, 9, 3, 1, [5] * 10, "ce", False, OPT[0], dev=dev)
    elif case == "omega=1":
        run_segments(backend, 2, 6, 1, 3, [1] * 12, "mse", True, OPT[1], dev=dev)
    elif case == "omega=200":
        if not small:  # the interpreter takes ~20 s per 200 steps: the per-step case only
            run_segments(backend, 2, 5, 2, 2, [200, 137], "mse", False, OPT[0], dev=dev)
        run_segments(backend, 3, 3, 4, 1, [200], "ce", True, OPT[2], dev=dev)
    elif small:
        run_segments(backend, 17, 19, 11, 5, [3] * 10, "ce", True, OPT[0], dev=dev)
    else:  # H, I, O larger than a tile and not multiples of one; B odd
        run_segments(backend, 37, 67, 11, 5, [4] * 10, "ce", True, OPT[0], dev=dev)


def _reference_model(m):
    model = reference.LSTMWithHead(m.input_size, m.hidden_size, m.output_size)
    sd = m.lstm_state_dict()
    model.load_state_dict({("lstm." + k if k in LSTM_KEYS else k): v for k, v in sd.items()})
    return model


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True])
def test_gradients_match_autograd(backend, loss, per_step, fresh_seed):
    if backend == "cpu":
        _need_cpu()
    I, H, O, B, omega = 3, 11, 4, 5, 7
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend)
    model = _reference_model(m)
    x = torch.randn(omega, B, I)
    y = make_target(loss, per_step, omega, B, O)
    state = (torch.randn(B, H) * 0.5, torch.randn(B, H) * 0.5)
    weight = 0.37
    seg, new_state = reference.segment_loss(model, x, y, state, loss, per_step)
    (weight * seg).backward()
    want = dict(zip(PARAM_NAMES, [p.grad for p in model.parameters()]))
    before = m.lstm_state_dict()
    got_loss, got_state, got = m.loss_and_grads(x, y, state, weight=weight)
    assert abs(got_loss.item() - seg.item()) <= 1e-5 * max(1.0, abs(seg.item()))
    for u, v in zip(got_state, new_state):
        assert scaled_err(u, v.detach(), 1.0) <= 1e-5
    for name in PARAM_NAMES:
        gscale = max(want[name].abs().max().item(), 1e-3)
        assert scaled_err(got[name], want[name], gscale) <= 1e-4, name
    # no update happened
    for name, v in m.lstm_state_dict().items():
        assert torch.equal(v, before[name])


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True), ("ce", False)])
def test_train_sequence_matches_reference_loop(backend, loss, per_step, fresh_seed):
    dev = _require(backend)
    I, H, O, B, T, K = 2, 10, 3, 4, 23, 4
    kw = dict(optimizer="adam", lr=2e-3, clip=1.0, eps=ADAM_EPS)
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev,
                           **kw)
    model = _reference_model(m).to(dev)
    opt = fptt_fast.FPTT(model.parameters(), backend="reference", **kw)
    for epoch in range(1 if _small(backend, dev) else 3):
        x = torch.randn(T, B, I, device=dev)
        y = (make_target(loss, per_step, T, B, O, dev) if per_step
             else make_target(loss, False, 1, B, O, dev))
        want = torch.stack(reference.train_sequence_fptt(model, opt, x, y, K, loss, per_step))
        got = m.train_sequence(x, y, K)
        assert got.shape == (K,)
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
    scale = max(p.abs().max().item() for p in model.parameters())
    for name, p, q in zip(PARAM_NAMES, m.fptt_parameters(), model.parameters()):
        assert scaled_err(p.detach(), q.detach(), scale) <= TOL, name
        assert scaled_err(m.optimizer.state[p]["w_bar"], opt.state[q]["w_bar"], scale) <= TOL, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nn_lstm_weights_give_nn_lstm_outputs(backend, fresh_seed):
    _require(backend)
    I, H, O, B, T = 5, 13, 3, 4, 9
    lstm, head = nn.LSTM(I, H), nn.Linear(H, O)
    m = fptt_fast.FPTTLSTM(I, H, O, backend=backend)
    m.load_lstm_state_dict(lstm.state_dict(), head=head.state_dict())
    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    with torch.no_grad():
        outs, (hn, cn) = lstm(x, (h0[None], c0[None]))
        want = head(outs)
        got, (h, c) = m(x, (h0, c0))
    assert scaled_err(got, want, 1.0) <= 1e-5
    assert scaled_err(h, hn[0], 1.0) <= 1e-5 and scaled_err(c, cn[0], 1.0) <= 1e-5
    # the loss of a training step is the loss of nn.LSTM's output
    y = torch.randn(B, O)
    loss, _ = m.train_segment(x, y, (h0, c0))
    assert abs(loss.item() - nn.functional.mse_loss(want[-1], y).item()) <= 1e-5
    # and back: the module's weights load into nn.LSTM + nn.Linear
    sd = m.lstm_state_dict()
    lstm.load_state_dict({k: sd[k] for k in LSTM_KEYS})
    head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    with torch.no_grad():
        assert scaled_err(head(lstm(x)[0]), m(x)[0], 1.0) <= 1e-5


def test_cpu_backend_is_deterministic(fresh_seed):
    _need_cpu()
    a = fptt_fast.FPTTLSTM(3, 20, 2, loss="ce", backend="cpu", clip=1.0)
    b = fptt_fast.FPTTLSTM(3, 20, 2, loss="ce", backend="cpu", clip=1.0)
    b.load_lstm_state_dict(a.lstm_state_dict())
    x, y = torch.randn(30, 17, 3), torch.randint(0, 2, (17,))
    la, lb = a.train_sequence(x, y, 3), b.train_sequence(x, y, 3)
    assert torch.equal(la, lb)
    for p, q in zip(a.fptt_parameters(), b.fptt_parameters()):
        assert torch.equal(p, q)


def test_auto_backend_and_noncontiguous_input(fresh_seed):
    m = fptt_fast.FPTTLSTM(3, 6, 2)
    assert m.backend == ("cpu" if _cpu_segment_reason() is None else "reference")
    xt = torch.randn(4, 5, 3)
    x_nc = xt.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not x_nc.is_contiguous()
    out_a, _ = m(xt)
    out_b, _ = m(x_nc)
    assert torch.equal(out_a, out_b)
    n = fptt_fast.FPTTLSTM(3, 6, 2, backend=m.backend)
    n.load_lstm_state_dict(m.lstm_state_dict())
    y = torch.randn(5, 2)
    assert torch.equal(m.train_segment(xt, y)[0], n.train_segment(x_nc, y)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs_raise(backend):
    _require(backend)
    I, H, O, B = 3, 4, 2, 5
    m = fptt_fast.FPTTLSTM(I, H, O, backend=backend)
    ce = fptt_fast.FPTTLSTM(I, H, O, loss="ce", backend=backend)
    ps = fptt_fast.FPTTLSTM(I, H, O, per_step=True, backend=backend)
    x, y = torch.randn(6, B, I), torch.randn(B, O)
    with pytest.raises(ValueError, match="I=3"):
        m.train_segment(torch.randn(6, B, I + 1), y)
    with pytest.raises(ValueError, match="time-major"):
        m.train_segment(torch.randn(B, I), y)
    with pytest.raises(TypeError, match="float32"):
        m.train_segment(x.double(), y)
    bad = x.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.train_segment(bad, y)
    with pytest.raises(ValueError, match="NaN"):
        m(bad)
    with pytest.raises(ValueError, match="mse target"):
        m.train_segment(x, torch.randn(B))
    with pytest.raises(ValueError, match="mse target"):
        ps.train_segment(x, y)  # per-step needs [omega, B, O]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ce.train_segment(x, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ce.train_segment(x, torch.tensor([0, 1, -1, 0, 1]))
    with pytest.raises(TypeError, match="integer"):
        ce.train_segment(x, torch.zeros(B))
    with pytest.raises(ValueError, match="state h"):
        m.train_segment(x, y, (torch.zeros(B + 1, H), torch.zeros(B, H)))
    with pytest.raises(ValueError, match="pair"):
        m.train_segment(x, y, torch.zeros(B, H))
    with pytest.raises(ValueError, match="weight"):
        m.train_segment(x, y, weight=float("inf"))
    with pytest.raises(ValueError, match="T >= K"):
        m.train_sequence(x, y, 7)
    before = m.lstm_state_dict()
    with pytest.raises(ValueError, match="weight_hh_l0"):
        m.load_lstm_state_dict({**before, "weight_hh_l0": torch.zeros(4 * H, H + 1)})
    with pytest.raises(ValueError, match="misses"):
        m.load_lstm_state_dict({k: v for k, v in before.items() if k != "bias_ih_l0"})
    with pytest.raises(ValueError, match="unexpected"):
        m.load_lstm_state_dict({**before, "weight_ih_l1": before["weight_ih_l0"]})
    for name, v in m.lstm_state_dict().items():  # nothing above changed the module
        assert torch.equal(v, before[name])
    assert int(m.optimizer.state[m.weight_hh_l0]["step"]) == 0


def test_bad_construction_raises():
    with pytest.raises(TypeError, match="float32"):
        fptt_fast.FPTTLSTM(2, 3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss"):
        fptt_fast.FPTTLSTM(2, 3, 1, loss="l1")
    with pytest.raises(ValueError, match="hidden_size"):
        fptt_fast.FPTTLSTM(2, 0, 1)
    with pytest.raises(ValueError, match="backend"):
        fptt_fast.FPTTLSTM(2, 3, 1, backend="gpu")
    with pytest.raises(ValueError, match="alpha"):
        fptt_fast.FPTTLSTM(2, 3, 1, alpha=0.0)
    from fptt_fast.kernels import lstm_segment as ks
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(ValueError, match="MAX_OUTPUT"):
        fptt_fast.FPTTLSTM(2, 3, ks.MAX_OUTPUT + 1, backend="triton", device=dev)
    if _cuda_segment_reason("cpu") is not None:
        with pytest.raises(RuntimeError, match="cuda"):
            fptt_fast.FPTTLSTM(2, 3, 1, backend="cuda")


def test_nonfinite_gradient_changes_nothing():
    m = fptt_fast.FPTTLSTM(2, 3, 1, nonfinite="skip", check_inputs=True)
    before = m.lstm_state_dict()
    x, y = torch.randn(3, 2, 2), torch.full((2, 1), 3e38)  # finite inputs, inf gradient
    m.train_segment(x, y, weight=10.0)
    assert m.optimizer.skipped_steps == 1
    for name, v in m.lstm_state_dict().items():
        assert torch.equal(v, before[name])
    r = fptt_fast.FPTTLSTM(2, 3, 1, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        r.train_segment(x, y, weight=10.0)


def test_cpu_segment_source_needs_no_torch():
    """csrc/cpu/lstm_segment.cpp and lstm_math.h compile with no torch headers at all."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.join(os.path.dirname(__file__), "..")
    r = subprocess.run([cxx, "-std=c++17", "-fopenmp", "-fsyntax-only", "-Wall",
                        "-I", os.path.join(root, "csrc", "include"),
                        os.path.join(root, "csrc", "cpu", "lstm_segment.cpp")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_module_cast_to_other_dtype_raises():
    m = fptt_fast.FPTTLSTM(2, 3, 1)
    m.double()
    with pytest.raises(TypeError, match="float32"):
        m.train_segment(torch.randn(2, 1, 2), torch.randn(1, 1))
