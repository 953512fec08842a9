"""FPTTGRU, the second cell of fptt_fast.recurrent: nn.GRU's conventions (forward, state
dict, stacking, batch_first) and its training against nn.GRU + nn.Linear trained per
segment by the reference FPTT (reference and cpu, one to three layers); the cpu kernel's
gradients and a stacked layer's launch against autograd; what it refuses."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast
from fptt_fast import backends, reference
from fptt_fast.layout import LOSS_CODE, OPT_CODE
from fptt_fast.seam import FpttState, SegmentConfig, SegmentIO

from .utils import (TOL_MATMUL, TOL_UPDATE, backend_device, finish_background_compile,
                    interpreted, make_target, scaled_err, sm90_compile_script,
                    start_background_compile)

I, H, O, B = 3, 9, 2, 5
OPT = dict(optimizer="sgd", lr=0.05, momentum=0.5, alpha=0.3, clip=1.0)


def torch_twin(m):
    """nn.GRU(batch_first=m's, num_layers=m's) + nn.Linear loaded into m (whose FPTT state
    starts afresh), and their reference FPTT."""
    dev = m.weight_hh_l0.device
    gru = nn.GRU(I, H, batch_first=m.batch_first, num_layers=m.num_layers, device=dev)
    head = nn.Linear(H, O, device=dev)
    m.load_gru_state_dict(gru.state_dict(), head=head.state_dict())
    return gru, head, fptt_fast.FPTT([*gru.parameters(), *head.parameters()],
                                     backend="reference", **OPT)


@pytest.mark.parametrize("layers,batch_first", [(1, False), (2, True), (3, False)])
def test_forward_and_state_dict_are_nn_grus(layers, batch_first, fresh_seed):
    m = fptt_fast.FPTTGRU(I, H, O, num_layers=layers, batch_first=batch_first)
    gru, head, _ = torch_twin(m)
    x = torch.randn(B, 7, I) if batch_first else torch.randn(7, B, I)
    h0 = torch.randn(layers, B, H) if layers > 1 else torch.randn(B, H)
    out, h = m(x, h0)
    want, hn = gru(x, h0 if layers > 1 else h0[None])
    assert scaled_err(out, head(want).detach(), 1.0) <= 1e-5
    assert scaled_err(h, (hn if layers > 1 else hn[0]).detach(), 1.0) <= 1e-5
    sd = m.gru_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in gru.state_dict().items())


@pytest.mark.parametrize("backend,layers", [("reference", 1), ("cpu", 1), ("cpu", 2),
                                            ("triton", 1), ("triton", 2), ("auto", 3)])
@pytest.mark.parametrize("per_step", [False, True])
def test_matches_nn_gru_trained_per_segment(backend, layers, per_step, fresh_seed):
    dev = backend_device(backend, "lstm") if backend != "auto" else "cpu"
    m = fptt_fast.FPTTGRU(I, H, O, per_step=per_step, batch_first=True, backend=backend,
                          num_layers=layers, device=dev, **OPT)
    assert m.backend == ("cpu" if backend == "auto" else backend)
    gru, head, opt = torch_twin(m)
    state, twin_state = None, None
    for k in range(4 if interpreted(backend) else 20):
        omega = 1 + k % 4
        x = torch.randn(B, omega, I, device=dev)
        y = torch.randn(B, omega, O, device=dev) if per_step else torch.randn(B, O, device=dev)
        weight = 0.5 + k % 3
        loss, state = m.train_segment(x, y, state, weight=weight)
        out, h = gru(x, twin_state)
        pred = head(out) if per_step else head(out[:, -1])
        want = F.mse_loss(pred, y)
        opt.zero_grad()
        (weight * want).backward()
        opt.step()
        twin_state = h.detach()
        assert abs(loss.item() - want.item()) <= 1e-4 * max(1.0, want.item())
        assert state.shape == ((B, H) if layers == 1 else (layers, B, H))
        assert scaled_err(state.reshape(-1, B, H), twin_state, 1.0) <= 1e-4
    theirs = [*gru.parameters(), *head.parameters()]
    scale = max(p.abs().max().item() for p in theirs)
    for p, q in zip(m.fptt_parameters(), theirs):
        assert scaled_err(p, q, scale) <= TOL_UPDATE


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True), ("ce", False)])
@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_match_autograd(backend, loss, per_step, layers, fresh_seed):
    """loss_and_grads on the backend's kernel against autograd through the reference
    math; nothing is updated."""
    dev = backend_device(backend, "lstm")
    m = fptt_fast.FPTTGRU(I, H, 4, loss=loss, per_step=per_step, backend=backend,
                          num_layers=layers, device=dev)
    omega = 6
    x = torch.randn(omega, B, I, device=dev)
    y = make_target(loss, per_step, omega, B, 4, device=dev)
    h0 = torch.randn(*((layers,) if layers > 1 else ()), B, H, device=dev) * 0.5
    weight = 0.7
    with torch.enable_grad():
        seg, new_state = m._reference_loss(x, y, (h0,))
        want = torch.autograd.grad(weight * seg, m.fptt_parameters())
    before = m.gru_state_dict()
    got_loss, got_h, got = m.loss_and_grads(x, y, h0, weight=weight)
    assert abs(got_loss.item() - seg.item()) <= 1e-5 * max(1.0, abs(seg.item()))
    assert scaled_err(got_h, new_state[0].detach(), 1.0) <= 1e-5
    for name, w in zip(m._param_names, want):
        assert scaled_err(got[name], w, max(w.abs().max().item(), 1e-3)) <= TOL_MATMUL, name
    for name, v in m.gru_state_dict().items():
        assert torch.equal(v, before[name])


def test_cpu_layer_without_head_matches_autograd(fresh_seed):
    """A stacked layer's launch of the GRU kernel: dh_seq in, dx, h_seq and the four
    gradients out, against autograd through reference.gru_layer."""
    T = 6
    params = [torch.randn(3 * H, I) * 0.4, torch.randn(3 * H, H) * 0.4, torch.randn(3 * H) * 0.2,
              torch.randn(3 * H) * 0.2]
    x, h0, dh_seq = torch.randn(T, B, I), torch.randn(B, H) * 0.5, torch.randn(T, B, H)
    leaves = [t.clone().requires_grad_() for t in (*params, x)]
    outs, h = reference.gru_layer(leaves[4], h0, *leaves[:4])
    want = torch.autograd.grad((outs * dh_seq).sum(), leaves)
    grads = [torch.full_like(p, float("nan")) for p in params]
    state = FpttState(params, grads, [], [], [], [], [], None, [], OPT_CODE["sgd"])
    io = SegmentIO(x, None, h0, None, dh_seq=dh_seq, dx=torch.full_like(x, float("nan")),
                   h_seq=torch.full((T, B, H), float("nan")))
    loss, h_out = backends.extension().gru_segment_step_cpu(
        state, io, SegmentConfig(loss=LOSS_CODE["mse"], update=False, head=False),
        torch.empty(0))
    assert loss == 0.0
    for g, w in zip([*grads, io.dx], want):
        assert scaled_err(g, w, max(w.abs().max().item(), 1e-3)) <= TOL_MATMUL
    assert scaled_err(io.h_seq, outs.detach(), 1.0) <= 1e-5
    assert scaled_err(h_out, h.detach(), 1.0) <= 1e-5


def test_train_sequence_carries_h(fresh_seed):
    """train_sequence equals train_segment over the same segments, bitwise (cpu)."""
    torch.manual_seed(fresh_seed)
    a = fptt_fast.FPTTGRU(I, H, O, backend="cpu")
    b = fptt_fast.FPTTGRU(I, H, O, backend="cpu")
    b.load_gru_state_dict(a.gru_state_dict())
    a.optimizer.load_state_dict(b.optimizer.state_dict())
    x, y = torch.randn(10, B, I), torch.randn(B, O)
    losses = a.train_sequence(x, y, 3)
    h = None
    for p, (lo, hi) in enumerate(reference.segment_bounds(10, 3)):
        loss, h = b.train_segment(x[lo:hi], y, h, weight=(p + 1) / 3)
        assert torch.equal(loss, losses[p])
    for p, q in zip(a.fptt_parameters(), b.fptt_parameters()):
        assert torch.equal(p, q)


def test_refusals_name_the_way():
    assert backends.segment_unavailable_reason("cuda", "cuda", fptt_fast.gru.GRU) == (
        "FPTTGRU has no cuda segment kernel (it runs on reference, cpu, triton)")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="FPTTGRU has no cuda segment kernel"):
            fptt_fast.FPTTGRU(I, H, O, backend="cuda", device="cuda")
    m = fptt_fast.FPTTGRU(I, H, O, backend="cpu")
    with pytest.raises(ValueError, match=r"state must be the tensor h \[B, H\]"):
        m.train_segment(torch.randn(4, B, I), torch.randn(B, O), (torch.zeros(B, H),) * 2)
    with pytest.raises(ValueError, match="unexpected keys .*weight_ih_l1"):
        m.load_gru_state_dict(nn.GRU(I, H, num_layers=2).state_dict())
    with pytest.raises(ValueError, match="weight_ih_l0 has shape"):
        m.load_gru_state_dict(nn.LSTM(I, H).state_dict())
    gru = types.SimpleNamespace(num_layers=1, triton_kernel="persistent", cell=fptt_fast.gru.GRU)
    with pytest.raises(ValueError, match="triton_kernel='persistent' is an LSTM kernel"):
        backends.engine("triton").check_module(gru)
    with pytest.raises(TypeError, match="FPTTRecurrent is a base class"):
        fptt_fast.FPTTRecurrent(I, H, O)
    state = FpttState([p.detach() for p in m.fptt_parameters()],
                      [torch.zeros_like(p) for p in m.fptt_parameters()],
                      [], [], [], [], [], None, [], OPT_CODE["sgd"])
    x = torch.randn(4, B, I)
    with pytest.raises(RuntimeError, match="segment.c0 must be None"):
        backends.extension().gru_segment_step_cpu(
            state, SegmentIO(x, torch.randn(B, O), torch.zeros(B, H), torch.zeros(B, H)),
            SegmentConfig(update=False), torch.empty(0))


# The GRU kernel as a stacked layer's launch (no head, dh_seq in, dx and h_seq out, no
# update): the paths the LSTM kernel's compile (test_lstm_triton.py) does not take.
_AOT = sm90_compile_script(
    "gru_segment", "_gru_segment_kernel",
    consts='dict(LOSS=0, PER_STEP=False, OPT=1, BB=16, BH=32, BK=32, BR=32, BC=32, OP=16, '
           'PREC="ieee", CHUNK=16, BLOCK=16, PBLOCK=16, UPDATE=False, HEAD=False, '
           'FWD_ONLY=False, DX=True, HSEQ=True)',
    ptr_kinds={"tab_ptr": "*i64", "chunk_ptr": "*i64", "bar_ptr": "*i32"},
    scalar_kinds={"clip": "fp32", "dscale": "fp32", "lscale": "fp32"}, num_warps="4")
_SM90 = {}


def start_sm90_compile():
    """tests/conftest.py starts this compile as soon as the tests are chosen."""
    return start_background_compile(_SM90, _AOT, "fptt_gru_sm90_")


def test_gpu_path_compiles_for_sm90():
    """The Triton GRU kernel compiled ahead of time for sm_90 (no GPU needed): what the
    interpreter does not check (tl.dot tiles, grid barriers, register and shared use)."""
    stdout = finish_background_compile(start_sm90_compile())
    shared = int(stdout.split("SHARED")[1].split()[0])
    assert 0 < shared <= 48 * 1024, shared
    assert int(stdout.split("CUBIN")[1].split()[0]) > 0
