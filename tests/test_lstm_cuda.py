"""The one-launch CUDA LSTM segment step (csrc/cuda/lstm_segment.cu, through
FPTTLSTM(backend="cuda") and fptt_fast._C.lstm_segment_step_cuda) against the reference:
reference.LSTMWithHead + autograd + fptt_fast.FPTT(backend="reference"), segment after
segment (state carried), on a GPU.

Compared after every segment: the loss, the carried (h, c), the six parameters and their
FPTT state (w_bar, lam); tolerance max |diff| / max |w| <= 1e-4 (fp32; the kernel sums in
another order than cuBLAS). Large shapes use SGD with momentum rather than Adam: Adam's
first steps move every element by about lr * sign(g), so an element whose gradient is
within rounding of zero (a few in a million) may legitimately differ by ~lr. Adam and
AdamW run on the smaller shapes (the update code is the one tests/test_update_cuda.py
checks).

Skipped, with the reason, without a CUDA device or without lstm_segment_step_cuda in the
extension. The .cu file is compiled on every machine with nvcc by test_cuda_sources.py.
"""
import random

import pytest
import torch

import fptt_fast
from fptt_fast import backends, reference
from fptt_fast.lstm import LSTM_KEYS, PARAM_NAMES, _cuda_segment_reason

from .utils import scaled_err


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return _cuda_segment_reason("cuda")


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None,
                                reason=f"CUDA LSTM segment step unavailable: {_REASON}")

TOL = 1e-4
DEV = "cuda"
ADAM = dict(optimizer="adam", lr=1e-2, clip=1.0)
SGD = dict(optimizer="sgd", lr=0.05, momentum=0.9, clip=0.5, rho=0.5, c=2.0, weight_decay=1e-3)
ADAMW = dict(optimizer="adamw", lr=5e-3, weight_decay=0.1, alpha=0.3, beta=0.7, clip=None)


def make_target(loss, per_step, omega, B, O):
    lead = (omega, B) if per_step else (B,)
    if loss == "mse":
        return torch.randn(*lead, O, device=DEV)
    return torch.randint(0, O, lead, device=DEV)


class Reference:
    """reference.LSTMWithHead trained by autograd + FPTT(backend="reference")."""

    def __init__(self, m, opt_kw):
        self.model = reference.LSTMWithHead(m.input_size, m.hidden_size, m.output_size,
                                            device=DEV)
        sd = m.lstm_state_dict()
        self.model.load_state_dict({("lstm." + k if k in LSTM_KEYS else k): v
                                    for k, v in sd.items()})
        self.params = [self.model.lstm.weight_ih_l0, self.model.lstm.weight_hh_l0,
                       self.model.lstm.bias_ih_l0, self.model.lstm.bias_hh_l0,
                       self.model.head.weight, self.model.head.bias]
        self.opt = fptt_fast.FPTT(self.params, backend="reference", **opt_kw)
        self.loss, self.per_step = m.loss, m.per_step

    def train_segment(self, x, y, state, weight):
        if state is None:
            z = torch.zeros(x.shape[1], self.model.lstm.hidden_size, device=DEV)
            state = (z, z.clone())
        loss, new_state = reference.segment_loss(self.model, x, y, state, self.loss,
                                                 self.per_step)
        grads = torch.autograd.grad(weight * loss, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt.step()
        return loss.detach(), (new_state[0].detach(), new_state[1].detach())


def compare(m, ref, what):
    scale = max(p.abs().max().item() for p in ref.params)
    for name, p, q in zip(PARAM_NAMES, m.fptt_parameters(), ref.params):
        assert scaled_err(p, q, scale) <= TOL, f"{what}: {name}"
        sa, sb = m.optimizer.state[p], ref.opt.state[q]
        for field in ("w_bar", "lam"):
            assert scaled_err(sa[field], sb[field], scale) <= TOL, f"{what}: {name} {field}"
        assert int(sa["step"]) == int(sb["step"]), f"{what}: {name} step"


def run_segments(I, H, O, B, omegas, loss, per_step, opt_kw, state_scale=0.0):
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend="cuda", device=DEV,
                           **opt_kw)
    assert m.backend == "cuda"
    ref = Reference(m, opt_kw)
    s_m = s_r = None
    if state_scale:
        s_m = (torch.randn(B, H, device=DEV) * state_scale, torch.randn(B, H, device=DEV) * state_scale)
        s_r = tuple(t.clone() for t in s_m)
    for k, omega in enumerate(omegas):
        x = torch.randn(omega, B, I, device=DEV)
        y = make_target(loss, per_step, omega, B, O)
        w = 1.0 if per_step else (k + 1) / len(omegas)
        l_m, s_m = m.train_segment(x, y, s_m, weight=w)
        l_r, s_r = ref.train_segment(x, y, s_r, w)
        tag = f"segment {k} (omega={omega}, I={I}, H={H}, O={O}, B={B}, {loss}, per_step={per_step})"
        assert abs(l_m.item() - l_r.item()) <= TOL * max(1.0, abs(l_r.item())), tag + " loss"
        for u, v in zip(s_m, s_r):
            assert scaled_err(u, v, 1.0) <= TOL, tag + " state"
        compare(m, ref, tag)
    torch.cuda.synchronize()
    return m


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True])
def test_small_shapes_ten_segments(loss, per_step, fresh_seed):
    rng = random.Random(fresh_seed)
    for opt_kw in (ADAM, SGD, ADAMW):
        I = rng.choice([1, 3, 5, 37])
        H = rng.choice([3, 7, 13, 24, 67, 100])  # not powers of two
        O = rng.choice([1, 2, 5, 11])
        B = rng.choice([1, 2, 9, 33])
        omegas = [rng.randint(1, 9) for _ in range(10)]
        run_segments(I, H, O, B, omegas, loss, per_step, opt_kw, state_scale=0.5)


@pytest.mark.parametrize("case", ["B=1", "omega=1", "omega=200", "H=1", "wide"])
def test_edge_shapes(case):
    if case == "B=1":
        run_segments(4, 9, 3, 1, [5] * 10, "ce", False, ADAM)
    elif case == "omega=1":
        run_segments(2, 6, 1, 3, [1] * 12, "mse", True, SGD)
    elif case == "omega=200":
        run_segments(2, 5, 2, 2, [200, 137], "mse", False, ADAM)
        run_segments(3, 33, 4, 7, [200], "ce", True, ADAMW)
    elif case == "H=1":
        run_segments(1, 1, 1, 1, [3] * 10, "mse", False, SGD)
    else:  # H, I, O larger than a tile (32) and not multiples of one; B odd
        run_segments(37, 67, 11, 5, [4] * 10, "ce", True, ADAM)


@pytest.mark.parametrize("H", [128, 256, 512])
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_large_hidden(H, loss, per_step):
    run_segments(3, H, 10 if loss == "ce" else 1, 32, [20] * 10, loss, per_step, SGD,
                 state_scale=0.1)


def test_omega_200_hidden_128():
    run_segments(2, 128, 1, 16, [200] * 10, "mse", False, SGD)


def _run_bits(seed, opt_kw):
    torch.manual_seed(seed)
    m = fptt_fast.FPTTLSTM(5, 45, 3, loss="ce", per_step=True, backend="cuda", device=DEV,
                           **opt_kw)
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    state, losses = None, []
    for _ in range(4):
        x = torch.randn(7, 6, 5, device=DEV, generator=gen)
        y = torch.randint(0, 3, (7, 6), device=DEV, generator=gen)
        loss, state = m.train_segment(x, y, state)
        losses.append(loss.clone())
    st = m.optimizer.state
    return ([p.detach().clone() for p in m.fptt_parameters()] +
            [st[p][f].clone() for p in m.fptt_parameters() for f in ("w_bar", "lam")] +
            list(state) + losses + [m.optimizer.last_norm.clone()])


@pytest.mark.parametrize("opt_kw", [ADAM, SGD], ids=["adam", "sgd"])
def test_bitwise_deterministic(opt_kw):
    a, b = _run_bits(7, opt_kw), _run_bits(7, opt_kw)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_train_segment_is_one_kernel_launch():
    m = fptt_fast.FPTTLSTM(4, 64, 2, loss="mse", backend="cuda", device=DEV, check_inputs=False,
                           nonfinite="skip", optimizer="adam", lr=1e-3, clip=1.0)
    x = torch.randn(10, 8, 4, device=DEV)
    y = torch.randn(8, 2, device=DEV)
    state = (torch.zeros(8, 64, device=DEV), torch.zeros(8, 64, device=DEV))
    _, s = m.train_segment(x, y, state)  # warm-up: builds and caches the workspace
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        m.train_segment(x, y, s)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.lower().startswith(("memcpy", "memset"))]
    assert len(kernels) == 1, kernels
    assert "lstm_segment_kernel" in kernels[0], kernels


def _binding_args(m, x, y, state, tf32=False):
    opt = m.optimizer
    params = [p.detach() for p in m.fptt_parameters()]
    grads = [torch.zeros_like(p) for p in params]
    sts = [opt.state[p] for p in m.fptt_parameters()]
    return (x, y, state[0], state[1], 1.0, 0, False, params, grads,
            [s["w_bar"] for s in sts], [s["lam"] for s in sts], [s["exp_avg"] for s in sts],
            [s["exp_avg_sq"] for s in sts], [s["step"].view(1) for s in sts],
            opt._hyper_table(x.device), [0] * 6, 1, 1.0, opt._status,
            torch.empty_like(state[0]), torch.empty_like(state[1]),
            torch.empty((), device=DEV), tf32)


def test_binding_refuses_tf32_and_large_hidden():
    ext = backends.extension()
    m = fptt_fast.FPTTLSTM(2, 8, 1, backend="cuda", device=DEV)
    x, y = torch.randn(3, 2, 2, device=DEV), torch.randn(2, 1, device=DEV)
    state = (torch.zeros(2, 8, device=DEV), torch.zeros(2, 8, device=DEV))
    with pytest.raises(RuntimeError, match="tf32"):
        ext.lstm_segment_step_cuda(*_binding_args(m, x, y, state, tf32=True))
    # the hidden size is checked right after x, before any other tensor: only weight_hh
    # needs the large shape
    H = ext.cuda_lstm_max_hidden + 1
    args = list(_binding_args(m, x, y, state))
    args[7] = list(args[7])
    args[7][1] = torch.empty(4 * H, H, device=DEV)
    with pytest.raises(RuntimeError, match="kLstmMaxHidden"):
        ext.lstm_segment_step_cuda(*args)


def test_out_of_range_class_skips_the_update():
    m = fptt_fast.FPTTLSTM(2, 8, 3, loss="ce", backend="cuda", device=DEV, check_inputs=False,
                           nonfinite="skip")
    before = [p.detach().clone() for p in m.fptt_parameters()]
    x = torch.randn(4, 2, 2, device=DEV)
    m.train_segment(x, torch.tensor([0, 7], device=DEV))
    torch.cuda.synchronize()
    assert m.optimizer.skipped_steps == 1
    for p, q in zip(m.fptt_parameters(), before):
        assert torch.equal(p.detach(), q)
