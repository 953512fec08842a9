"""fptt_fast.FPTTLSTM: every segment-step backend against fptt_fast.reference.

Every backend (cpu, triton, cuda) runs on its own device (tests/utils.py:
backend_device): cpu on CPU tensors; triton on CUDA tensors when there is a GPU (many
programs, grid barriers), else through Triton's interpreter on CPU tensors (one program,
smaller cases); cuda on a GPU only (skipped elsewhere). Each is compared, segment after
segment, with the reference (reference.LSTMWithHead + autograd + FPTT(backend=
"reference"), tests/utils.py: LSTMPair): the loss, the carried (h, c), the task gradients,
the parameters and all their FPTT state, the step counts, the update's norm and status.
Outputs are poisoned (NaN) before each fused call. Tolerances: max |diff| / max |w| <=
1e-4 (fp32 through matmuls); h, c within 1e-4, and 1e-5 in the kernel cases (few
segments from a random FPTT state). Inputs are drawn fresh for each run
(fresh_seed is printed on failure). What only one backend has (launch counts, grid
limits, workspaces, TF32, binding errors) is in test_lstm_cuda.py and test_lstm_triton.py.
"""
import math
import os
import random
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn

import fptt_fast
from fptt_fast import reference
from fptt_fast.lstm import LSTM_KEYS, PARAM_NAMES
from fptt_fast.optim import STATUS_LAST_SKIPPED, STATUS_SKIPPED

from .utils import (ADAM_EPS, FUSED, LSTM_KERNEL_KW, LSTM_OPT, NAN, TOL_MATMUL, LSTMPair,
                    assert_all_equal, assert_unchanged, backend_device, device_of, fptt_weights,
                    interpreted, lstm_opts, lstm_run_bits, make_target, reference_model,
                    scaled_err, snapshot)

GPU_KERNELS = ("triton", "cuda")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True])
def test_random_shapes_ten_segments(backend, loss, per_step, fresh_seed):
    """Ten segments of random lengths, state carried, on random sizes (not powers of
    two); a trial per base optimiser on a GPU, two on the CPU, one in the interpreter."""
    dev = backend_device(backend, "lstm")
    small = interpreted(backend)
    rng = random.Random(fresh_seed)
    for trial in range(1 if small else 3 if dev == "cuda" else 2):
        I = rng.choice([1, 3, 5, 6] if small else [1, 3, 5, 6, 37])
        H = rng.choice([3, 7, 13] if small else [3, 7, 13, 24, 67, 100])
        O = rng.choice([1, 2, 5] if small else [1, 2, 5, 11])
        B = rng.choice([1, 2, 9] if small else [1, 2, 9, 33])
        omegas = [rng.randint(1, 4 if small else 9) for _ in range(10)]
        name = ("adam", "sgd", "adamw")[(trial + fresh_seed) % 3]
        # from a zero state (None) and from a random one; on a GPU both every trial
        for state_scale in (0.0, 0.5) if dev == "cuda" else (0.5 if trial else 0.0,):
            for kw in lstm_opts(name, backend):
                pair = LSTMPair(backend, I, H, O, loss=loss, per_step=per_step, device=dev,
                                **kw)
                pair.m.cpu_builtin_gemm = bool(trial)  # cpu: the torch-free GEMM, else at::mm
                pair.run(B, omegas, state_scale=state_scale, state_tol=TOL_MATMUL)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_step_at_each_thread_count(threads, fresh_seed):
    """The cpu step's GEMMs (MKL's packed products where torch's BLAS is MKL) and gate rows
    at 1 and 2 threads, on a shape large enough for the BLAS to split the work: the
    reference's numbers either way."""
    rng = random.Random(fresh_seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("adam", "sgd"):
            pair = LSTMPair("cpu", 5, 67, 3, loss="mse", per_step=bool(rng.getrandbits(1)),
                            **lstm_opts(name, "cpu")[0])
            pair.run(33, [rng.randint(3, 12) for _ in range(6)], state_tol=TOL_MATMUL)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", ["B=1", "omega=1", "omega=200", "H=1", "wide"])
def test_edge_shapes(backend, case, fresh_seed):
    dev = backend_device(backend, "lstm")
    small = interpreted(backend)

    def run(I, H, O, B, omegas, loss, per_step, name):
        for kw in lstm_opts(name, backend):
            LSTMPair(backend, I, H, O, loss=loss, per_step=per_step, device=dev,
                     **kw).run(B, omegas, state_tol=TOL_MATMUL)

    if case == "B=1":
        run(4, 9, 3, 1, [5] * 10, "ce", False, "adam")
    elif case == "omega=1":
        run(2, 6, 1, 3, [1] * 12, "mse", True, "sgd")
    elif case == "omega=200":
        if not small:  # the interpreter takes ~20 s per 200 steps: the per-step case only
            run(2, 5, 2, 2, [200, 137], "mse", False, "adam")
            run(3, 33, 4, 7, [200], "ce", True, "adamw")
        run(3, 3, 4, 1, [200], "ce", True, "adamw")
    elif case == "H=1":
        run(1, 1, 1, 1, [3] * (3 if small else 10), "mse", False, "sgd")
    elif small:
        run(17, 19, 11, 5, [3] * 10, "ce", True, "adam")
    else:  # H, I, O larger than a tile (32) and not multiples of one; B odd
        run(37, 67, 11, 5, [4] * 10, "ce", True, "adam")


# T, B, I, H, O, loss, per_step, optimizer, opt_kw, clip
CASES = [
    (4, 3, 5, 7, 3, "mse", False, "adam", dict(weight_decay=0.01), 1.0),
    (3, 1, 3, 10, 5, "ce", False, "sgd", dict(momentum=0.9, nesterov=True), 0.1),
    (1, 2, 2, 5, 2, "mse", True, "adamw", dict(weight_decay=0.05), None),
    (20, 2, 3, 6, 4, "ce", True, "adam", {}, 1.0),                    # a longer segment
    (3, 5, 3, 70, 2, "mse", False, "sgd", dict(momentum=0.8), 1e6),   # several hidden blocks
    (2, 70, 2, 5, 3, "ce", False, "adam", {}, 1.0),                   # several batch tiles
    (2, 3, 1, 1, 1, "mse", True, "sgd", {}, 1.0),                     # H = I = O = 1
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("T,B,I,H,O,loss,per_step,optimizer,opt_kw,clip", CASES)
def test_kernel_cases_match_reference(backend, T, B, I, H, O, loss, per_step, optimizer, opt_kw,
                                      clip, fresh_seed):
    dev = backend_device(backend, "lstm")
    pair = LSTMPair(backend, I, H, O, loss=loss, per_step=per_step, device=dev,
                    optimizer=optimizer, clip=clip, **opt_kw, **LSTM_KERNEL_KW)
    pair.run(B, [T, T], weights=[0.7, 1.3], state_scale=0.5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_ten_segments_carrying_state(backend, loss, per_step, fresh_seed):
    """K = 10 consecutive segments, (h, c) carried, FPTT's weights."""
    dev = backend_device(backend, "lstm")
    pair = LSTMPair(backend, 3, 6, 3, loss=loss, per_step=per_step, device=dev, optimizer="adam",
                    clip=1.0, **LSTM_KERNEL_KW)
    pair.run(2, [3] * 10, weights=fptt_weights(10, per_step), state_scale=0.5)


@pytest.mark.parametrize("backend", FUSED)
def test_nonfinite_input_skips_the_update(backend, fresh_seed):
    """A NaN in the input: the step changes nothing, status says so (as the optimiser),
    the loss and gradients are NaN; the next finite segment trains again."""
    dev = backend_device(backend, "lstm")
    pair = LSTMPair(backend, 3, 5, 2, device=dev, check_inputs=False, optimizer="adam", clip=1.0,
                    **LSTM_KERNEL_KW)
    state = tuple(torch.randn(2, 5, device=dev) * 0.5 for _ in "hc")
    s_f, s_r = pair.segment(*pair.draw(3, 2), state, state, 1.0)
    params, opt = pair.m.fptt_parameters(), pair.m.optimizer
    snap = snapshot(params, opt)
    x, y = pair.draw(3, 2)
    x[1, 0, 2] = NAN
    loss, _, grads = pair.fused(x, y, s_f, 1.0)
    pair.ref(x, y, s_r, 1.0)
    assert pair.opt._status[STATUS_LAST_SKIPPED].item() == 1.0  # the reference skipped too
    assert opt._status[STATUS_LAST_SKIPPED].item() == 1.0 and opt.skipped_steps == 1
    assert not math.isfinite(opt.last_norm.item())
    assert torch.isnan(loss).all() and torch.isnan(grads[0]).any()
    assert_unchanged(params, opt, snap)  # bitwise: w, w_bar, lam, optimiser state, step
    pair.compare_params()
    pair.segment(*pair.draw(3, 2), s_f, s_r, 1.0)  # trains again, from the unchanged state
    assert opt._status[STATUS_SKIPPED].item() == 1.0


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_out_of_range_class_skips_the_update(backend, fresh_seed):
    """The one-launch kernels cannot check class indices without a host sync: an index
    outside [0, O) poisons its row, so the update is skipped and counted."""
    dev = backend_device(backend, "lstm")
    m = fptt_fast.FPTTLSTM(2, 8, 3, loss="ce", backend=backend, device=dev, check_inputs=False,
                           nonfinite="skip")
    before = [p.detach().clone() for p in m.fptt_parameters()]
    m.train_segment(torch.randn(4, 2, 2, device=dev), torch.tensor([0, 7], device=dev))
    assert m.optimizer.skipped_steps == 1
    for p, q in zip(m.fptt_parameters(), before):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend, fresh_seed):
    """Two runs of the same segments: bitwise the same losses, state, gradients, weights,
    FPTT state and status. Adam and SGD; Adam only in the interpreter (one program).
    Cross-entropy, per step on a GPU, terminal on the CPU."""
    dev = backend_device(backend, "lstm")
    small = interpreted(backend)
    sizes = (2, 6, 3, 3, 4) if small else (5, 45, 3, 6, 7)  # I, H, O, B, T
    for kw in [dict(optimizer="adam", lr=1e-2, weight_decay=0.01, clip=1.0)] + \
            ([] if small else [LSTM_OPT["sgd"]]):
        a, b = (lstm_run_bits(backend, dev, fresh_seed, sizes, kw, 2 if small else 4,
                              per_step=dev == "cuda") for _ in range(2))
        assert_all_equal(a, b)


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("H", [128, 256, 512])
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_large_hidden(backend, H, loss, per_step, fresh_seed):
    """Hidden sizes of several tiles, 10 segments of 20 steps (SGD with momentum: Adam's
    first steps move every element by ~lr * sign(g), which rounding can flip where g ~ 0)."""
    dev = backend_device(backend, "lstm")
    if interpreted(backend):
        pytest.skip("sized for a GPU: far too slow in Triton's interpreter")
    pair = LSTMPair(backend, 3, H, 10 if loss == "ce" else 1, loss=loss, per_step=per_step,
                    device=dev, **LSTM_OPT["sgd"])
    pair.run(32, [20] * 10, weights=fptt_weights(10, per_step), state_scale=0.1,
             state_tol=TOL_MATMUL)


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_omega_200_hidden_128(backend, fresh_seed):
    dev = backend_device(backend, "lstm")
    if interpreted(backend):
        pytest.skip("sized for a GPU: far too slow in Triton's interpreter")
    LSTMPair(backend, 2, 128, 1, device=dev, **LSTM_OPT["sgd"]).run(
        16, [200] * 10, weights=fptt_weights(10, False), state_tol=TOL_MATMUL)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True])
def test_gradients_match_autograd(backend, loss, per_step, fresh_seed):
    """loss_and_grads: the backend's segment with its update off (the fused backends' own
    kernels) against autograd through the reference model; no update happens."""
    dev = backend_device(backend, "lstm")
    I, H, O, B, omega = 3, 11, 4, 5, 7
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev)
    model = reference_model(m)
    x = torch.randn(omega, B, I, device=dev)
    y = make_target(loss, per_step, omega, B, O, device=dev)
    state = (torch.randn(B, H, device=dev) * 0.5, torch.randn(B, H, device=dev) * 0.5)
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
        assert scaled_err(got[name], want[name], gscale) <= TOL_MATMUL, name
    # no update happened
    for name, v in m.lstm_state_dict().items():
        assert torch.equal(v, before[name])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("loss,per_step,weights", [("mse", False, "ramp"), ("ce", True, "ramp"),
                                                  ("ce", False, "ramp"), ("mse", False, "authors")])
def test_train_sequence_matches_reference_loop(backend, loss, per_step, weights, fresh_seed):
    dev = backend_device(backend, "lstm")
    I, H, O, B, T, K = 2, 10, 3, 4, 23, 4
    kw = dict(optimizer="adam", lr=2e-3, clip=1.0, eps=ADAM_EPS)
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev,
                           **kw)
    model = reference_model(m)
    opt = fptt_fast.FPTT(model.parameters(), backend="reference", **kw)
    for epoch in range(1 if interpreted(backend) else 3):
        x = torch.randn(T, B, I, device=dev)
        y = (make_target(loss, per_step, T, B, O, dev) if per_step
             else make_target(loss, False, 1, B, O, dev))
        want = torch.stack(reference.train_sequence_fptt(model, opt, x, y, K, loss, per_step,
                                                         weights=weights))
        got = m.train_sequence(x, y, K, weights=weights)
        assert got.shape == (K,)
        assert (got - want).abs().max().item() <= TOL_MATMUL * max(1.0, want.abs().max().item())
    scale = max(p.abs().max().item() for p in model.parameters())
    for name, p, q in zip(PARAM_NAMES, m.fptt_parameters(), model.parameters()):
        assert scaled_err(p, q, scale) <= TOL_MATMUL, name
        assert scaled_err(m.optimizer.state[p]["w_bar"], opt.state[q]["w_bar"], scale) <= TOL_MATMUL, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nn_lstm_weights_give_nn_lstm_outputs(backend, fresh_seed):
    backend_device(backend, "lstm")
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


def test_auto_backend_and_noncontiguous_input(fresh_seed):
    backend_device("cpu", "lstm")  # the extension is built on every test machine
    m = fptt_fast.FPTTLSTM(3, 6, 2)
    assert m.backend == "cpu"
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
    backend_device(backend, "lstm")
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
        fptt_fast.FPTTLSTM(2, 3, 1, alpha=-0.1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda': no CUDA device is available"):
            fptt_fast.FPTTLSTM(2, 3, 1, device="cuda")
    from fptt_fast.kernels import lstm_segment as ks
    with pytest.raises(ValueError, match="MAX_OUTPUT"):
        fptt_fast.FPTTLSTM(2, 3, ks.MAX_OUTPUT + 1, backend="triton", device=device_of("triton"))
    with pytest.raises(RuntimeError, match="cuda"):  # CPU parameters (device=None)
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


@pytest.mark.parametrize("backend", FUSED)
def test_parameter_groups_are_honoured(backend, fresh_seed):
    """An FPTTLSTM whose optimiser holds two groups (the head with lr=0) updates each
    parameter with its own group's hyper-parameters on every backend, as the reference
    does: the head stays put, the LSTM weights move, and all match the reference. (The
    review of 2026-11-27 found the cpu step reading group 0's row for every parameter.)"""
    dev = backend_device(backend, "lstm")
    models = {}
    for b in (backend, "reference"):
        torch.manual_seed(fresh_seed)
        m = fptt_fast.FPTTLSTM(3, 5, 2, backend=b, device=dev, optimizer="sgd", lr=0.1,
                               momentum=0.9)
        ps = m.fptt_parameters()
        m.optimizer = fptt_fast.FPTT([{"params": ps[:4]}, {"params": ps[4:], "lr": 0.0}],
                                     lr=0.1, optimizer="sgd", momentum=0.9,
                                     backend=m.optimizer.backend)
        models[b] = m
    head_before = [p.detach().clone() for p in models[backend].fptt_parameters()[4:]]
    lstm_before = [p.detach().clone() for p in models[backend].fptt_parameters()[:4]]
    g = torch.Generator().manual_seed(fresh_seed)
    for _ in range(3):
        x = torch.randn(4, 6, 3, generator=g).to(dev)
        y = torch.randn(6, 2, generator=g).to(dev)
        for m in models.values():
            m.train_segment(x, y)
    fused, ref = (models[b].fptt_parameters() for b in (backend, "reference"))
    assert all(torch.equal(a, b) for a, b in zip(head_before, fused[4:]))
    assert not any(torch.equal(a, b) for a, b in zip(lstm_before, fused[:4]))
    scale = max(p.abs().max().item() for p in ref)
    for a, b in zip(fused, ref):
        assert scaled_err(a.detach(), b.detach(), scale) <= TOL_MATMUL
