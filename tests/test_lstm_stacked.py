"""Stacked layers on the fused backends: one layer's launch without the head (dh_seq in,
dx and h_seq out; forward_only) against autograd through reference.lstm_layer, and
FPTTLSTM(num_layers > 1)'s gradients (backends.base.stacked_segment) against autograd
through the reference stack; the seam's refusals of what a layer cannot take."""
import types

import pytest
import torch

import fptt_fast
from fptt_fast import backends, reference
from fptt_fast.layout import LOSS_CODE, OPT_CODE
from fptt_fast.seam import FpttState, SegmentConfig, SegmentIO

from .utils import FUSED, TOL_MATMUL, backend_device, make_target, scaled_err


def layer_case(dev, T, B, I, H):
    """A layer's parameters [w_ih, w_hh, b_ih, b_hh], x, h0, c0 and dh_seq (fresh draws)."""
    params = [torch.randn(4 * H, I, device=dev) * 0.4, torch.randn(4 * H, H, device=dev) * 0.4,
              torch.randn(4 * H, device=dev) * 0.2, torch.randn(4 * H, device=dev) * 0.2]
    x = torch.randn(T, B, I, device=dev)
    h0, c0 = torch.randn(B, H, device=dev) * 0.5, torch.randn(B, H, device=dev) * 0.5
    return params, x, h0, c0, torch.randn(T, B, H, device=dev)


def run_layer(backend, params, io, config):
    """One layer launch on `backend` (backends.<name>.layer) with poisoned gradient buffers;
    returns the gradients."""
    grads = [torch.full_like(p, float("nan")) for p in params]
    state = FpttState(params, grads, [], [], [], [], [], None, [], OPT_CODE["sgd"])
    m = types.SimpleNamespace(cpu_builtin_gemm=False, _workspace=None, last_kernel=None,
                              cell=fptt_fast.lstm.LSTM)
    backends.engine(backend).layer(m, state, io, config)
    return grads


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_dx", [True, False])
def test_layer_without_head_matches_autograd(backend, with_dx, fresh_seed):
    dev = backend_device(backend, "lstm")
    T, B, I, H = 6, 5, 3, 7
    params, x, h0, c0, dh_seq = layer_case(dev, T, B, I, H)
    leaves = [t.clone().requires_grad_() for t in (*params, x)]
    outs, (h, c) = reference.lstm_layer(leaves[4], h0, c0, *leaves[:4])
    want = torch.autograd.grad((outs * dh_seq).sum(), leaves)

    nan = float("nan")
    io = SegmentIO(x, None, h0, c0, torch.full_like(h0, nan), torch.full_like(c0, nan),
                   torch.full((1,), nan, device=dev), dh_seq=dh_seq,
                   dx=torch.full_like(x, nan) if with_dx else None,
                   h_seq=torch.full((T, B, H), nan, device=dev))
    config = SegmentConfig(loss=LOSS_CODE["mse"], update=False, head=False)
    grads = run_layer(backend, params, io, config)
    for got, w in zip(grads, want[:4]):
        assert scaled_err(got, w, max(w.abs().max().item(), 1e-3)) <= TOL_MATMUL
    if with_dx:
        assert scaled_err(io.dx, want[4], max(want[4].abs().max().item(), 1e-3)) <= TOL_MATMUL
    assert scaled_err(io.h_seq, outs.detach(), 1.0) <= 1e-5
    assert scaled_err(io.h_out, h.detach(), 1.0) <= 1e-5
    assert scaled_err(io.c_out, c.detach(), 1.0) <= 1e-5
    assert io.losses.item() == 0.0

    # the forward alone: the same outputs, and no gradient written
    fwd = SegmentIO(x, None, h0, c0, torch.full_like(h0, nan), torch.full_like(c0, nan),
                    torch.full((1,), nan, device=dev), h_seq=torch.full((T, B, H), nan, device=dev))
    grads = run_layer(backend, params, fwd,
                      SegmentConfig(loss=LOSS_CODE["mse"], update=False, head=False,
                                    forward_only=True))
    assert torch.equal(fwd.h_seq, io.h_seq)
    assert torch.equal(fwd.h_out, io.h_out) and torch.equal(fwd.c_out, io.c_out)
    assert all(torch.isnan(g).all() for g in grads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True), ("mse", True)])
@pytest.mark.parametrize("layers", [2, 3])
def test_stacked_gradients_match_autograd(backend, loss, per_step, layers, fresh_seed):
    """loss_and_grads of FPTTLSTM(num_layers) on the backend's layer launches against
    autograd through the reference stack (m._reference_loss); nothing is updated."""
    dev = backend_device(backend, "lstm")
    I, H, O, B, omega = 3, 8, 4, 5, 6
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev,
                           num_layers=layers)
    assert m.backend == backend
    x = torch.randn(omega, B, I, device=dev)
    y = make_target(loss, per_step, omega, B, O, device=dev)
    state = (torch.randn(layers, B, H, device=dev) * 0.5,
             torch.randn(layers, B, H, device=dev) * 0.5)
    weight = 0.61
    params = m.fptt_parameters()
    with torch.enable_grad():
        seg, new_state = m._reference_loss(x, y, state)
        want = torch.autograd.grad(weight * seg, params)
    before = m.lstm_state_dict()
    got_loss, got_state, got = m.loss_and_grads(x, y, state, weight=weight)
    assert abs(got_loss.item() - seg.item()) <= 1e-5 * max(1.0, abs(seg.item()))
    for u, v in zip(got_state, new_state):
        assert u.shape == (layers, B, H)
        assert scaled_err(u, v.detach(), 1.0) <= 1e-5
    for name, w in zip(m._param_names, want):
        assert scaled_err(got[name], w, max(w.abs().max().item(), 1e-3)) <= TOL_MATMUL, name
    for name, v in m.lstm_state_dict().items():
        assert torch.equal(v, before[name])


def test_layer_refusals_name_the_field():
    """lstm_segment_step_cpu refuses what a layer launch cannot take, naming the field."""
    ext = backends.extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    T, B, I, H = 4, 3, 2, 5
    params, x, h0, c0, dh_seq = layer_case("cpu", T, B, I, H)
    grads = [torch.zeros_like(p) for p in params]
    state = FpttState(params, grads, [], [], [], [], [], None, [], OPT_CODE["sgd"])
    ws = torch.empty(0)

    def call(io, **cfg):
        ext.lstm_segment_step_cpu(state, io, SegmentConfig(update=False, head=False, **cfg), ws)

    with pytest.raises(RuntimeError, match=r"segment.dh_seq \[omega, B, H\]; got None"):
        call(SegmentIO(x, None, h0, c0))
    with pytest.raises(RuntimeError, match="segment.dh_seq is read only by"):
        call(SegmentIO(x, None, h0, c0, dh_seq=dh_seq), forward_only=True)
    with pytest.raises(RuntimeError, match="segment.target must be None without the head"):
        call(SegmentIO(x, torch.zeros(B, 1), h0, c0, dh_seq=dh_seq))
    with pytest.raises(RuntimeError, match="segment.dx"):
        call(SegmentIO(x, None, h0, c0, dh_seq=dh_seq, dx=torch.zeros(T, B, I + 1)))
    with pytest.raises(RuntimeError, match="segment.dx is a gradient"):
        call(SegmentIO(x, None, h0, c0, dx=torch.zeros(T, B, I)), forward_only=True)
    with pytest.raises(RuntimeError, match="segment.dx shares memory with segment.x"):
        call(SegmentIO(x, None, h0, c0, dh_seq=dh_seq, dx=x))
    with pytest.raises(RuntimeError, match="config.update needs the head and the backward"):
        ext.lstm_segment_step_cpu(state, SegmentIO(x, None, h0, c0, dh_seq=dh_seq),
                                  SegmentConfig(update=True, head=False), ws)
    with pytest.raises(RuntimeError, match="a layer's 4 tensors"):
        six = FpttState(params + params[:2], grads + grads[:2], [], [], [], [], [], None, [], 0)
        ext.lstm_segment_step_cpu(six, SegmentIO(x, None, h0, c0, dh_seq=dh_seq),
                                  SegmentConfig(update=False, head=False), ws)


def test_persistent_kernels_and_graphs_refuse_stacks():
    """The one-launch kernels run one layer: a stack asks for the general kernel."""
    stack = types.SimpleNamespace(num_layers=2, cuda_kernel="persistent",
                                  triton_kernel="persistent", cell=fptt_fast.lstm.LSTM)
    with pytest.raises(ValueError, match="cuda_kernel='persistent' runs one layer"):
        backends.engine("cuda").check_module(stack)
    with pytest.raises(ValueError, match="triton_kernel='persistent' runs one layer"):
        backends.engine("triton").check_module(stack)
    assert backends.engine("cuda").one_launch(stack) is False


def test_cuda_layer_checks_with_cpu_stand_ins():
    """lstm_train_cuda's checks without the update (the gradients launch a stack's layers
    run), on CPU tensors standing in for CUDA ones (tests/csrc/check_bindings.cpp)."""
    from .seam_checks import check_ext
    cx = check_ext()
    T, B, I, H = 4, 3, 2, 5
    params, x, h0, c0, dh_seq = layer_case("cpu", T, B, I, H)
    state = FpttState(params, [torch.zeros_like(p) for p in params], [], [], [], [], [], None,
                      [], OPT_CODE["adam"])

    def check(io_kw, device_type="cpu", **cfg):
        io = SegmentIO(x, None, h0, c0, torch.empty(B, H), torch.empty(B, H), torch.empty(1),
                       **io_kw)
        return cx.lstm_segment_cuda(state, io, SegmentConfig(update=False, head=False, **cfg),
                                    device_type)

    assert check(dict(dh_seq=dh_seq, dx=torch.empty(T, B, I))) == (T, B, I, H, 0)
    assert check(dict(h_seq=torch.empty(T, B, H)), forward_only=True) == (T, B, I, H, 0)
    with pytest.raises(RuntimeError, match="general kernel runs one segment"):
        check(dict(dh_seq=dh_seq), kernel=2)
    with pytest.raises(RuntimeError, match="general kernel runs one segment"):
        check(dict(dh_seq=dh_seq), n_segs=2)
    with pytest.raises(RuntimeError, match="segment.dh_seq"):
        check({})
    with pytest.raises(RuntimeError, match="segment.h_seq shares memory with segment.dh_seq"):
        check(dict(dh_seq=dh_seq, h_seq=dh_seq))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        check(dict(dh_seq=dh_seq), device_type="cuda")


def test_one_launch_paths_refuse_the_layer_fields():
    """dh_seq, dx and h_seq belong to a stacked layer's launch (no update): the CUDA launch
    with the update and the persistent Triton kernel refuse them rather than ignore them."""
    from fptt_fast.kernels import lstm_persistent

    from .test_bindings import call, valid_case
    case = valid_case("lstm_segment_cuda_checks", 0)
    T, B, I, H, O = case.dims
    case.args.update(update=True, dx=torch.zeros(T, B, I))
    with pytest.raises(RuntimeError, match="belong to a stacked layer's launch"):
        call(case)
    x, h = torch.randn(4, 2, 3), torch.zeros(2, 5)
    state = FpttState([], [], [], [], [], [], [], None, [], OPT_CODE["sgd"])
    for io, config in ((SegmentIO(x, None, h, h, dx=torch.zeros_like(x)), SegmentConfig()),
                       (SegmentIO(x, None, h, h), SegmentConfig(update=False))):
        with pytest.raises(ValueError, match="runs whole one-layer segments with their update"):
            lstm_persistent.train(state, io, config)


def test_auto_picks_only_gpu_verified_kernels_on_a_gpu():
    """What has not run on a GPU (a stack's layer launches, the GRU's kernels) is not what
    backend="auto" picks there: FPTTRecurrent._gpu_verified. On a CPU auto takes cpu."""
    assert fptt_fast.FPTTLSTM(2, 4, 1)._gpu_verified()
    assert not fptt_fast.FPTTLSTM(2, 4, 1, num_layers=2)._gpu_verified()
    assert not fptt_fast.FPTTGRU(2, 4, 1)._gpu_verified()
    assert fptt_fast.FPTTLSTM(2, 4, 1, num_layers=2).backend == "cpu"
    assert fptt_fast.FPTTGRU(2, 4, 1, num_layers=2).backend == "cpu"
