"""What only the one-launch CUDA LSTM segment step (csrc/cuda/lstm_segment.cu, through
FPTTLSTM(backend="cuda") and fptt_fast._C.lstm_segment_step_cuda) has: one kernel launch
per segment, and its binding's refusals (TF32, hidden sizes beyond its limit). Its match
with the reference (small, edge, large and long shapes, Adam/AdamW at the default eps,
non-finite inputs, out-of-range classes, determinism) is tested with every backend in
test_lstm.py.

Skipped, with the reason, without a CUDA device or without lstm_segment_step_cuda in the
extension. The .cu file is compiled on every machine with nvcc by test_cuda_sources.py.
"""
import pytest
import torch

import fptt_fast
from fptt_fast import backends
from fptt_fast.backends import segment_unavailable_reason
from fptt_fast.seam import SegmentConfig, SegmentIO


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return segment_unavailable_reason("cuda", "cuda")


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None,
                                reason=f"CUDA LSTM segment step unavailable: {_REASON}")

DEV = "cuda"


@pytest.mark.parametrize("kernel,name", [("general", "lstm_segment_kernel"),
                                         ("persistent", "lstm_persistent_kernel")])
def test_train_segment_is_one_kernel_launch(kernel, name):
    """One launch of the chosen kernel, nothing else (no copy kernels, no update launch);
    at these sizes "auto" picks the persistent kernel on sm_90 (the GPU run of 2026-11-27
    caught this test still expecting the general one)."""
    if kernel == "persistent" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the persistent kernel needs sm_90 (thread-block clusters)")
    m = fptt_fast.FPTTLSTM(4, 64, 2, loss="mse", backend="cuda", device=DEV, check_inputs=False,
                           nonfinite="skip", optimizer="adam", lr=1e-3, clip=1.0,
                           cuda_kernel=kernel)
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
    assert name in kernels[0] and m.last_kernel == kernel, (kernels, m.last_kernel)


def _binding_args(m, x, y, state, tf32=False):
    """(state, segment, config) of one segment as FPTTLSTM hands them to the binding, with
    gradient buffers of their own."""
    grads = [torch.zeros_like(p.detach()) for p in m.fptt_parameters()]
    fstate = m.optimizer.kernel_state(m.fptt_parameters(), grads, x.device)
    io = SegmentIO(x, y, state[0], state[1], torch.empty_like(state[0]),
                   torch.empty_like(state[1]), torch.empty(1, device=DEV))
    return fstate, io, SegmentConfig(tf32=tf32)


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
    fstate, io, config = _binding_args(m, x, y, state)
    fstate.params = list(fstate.params)
    fstate.params[1] = torch.empty(4 * H, H, device=DEV)
    with pytest.raises(RuntimeError, match="kLstmMaxHidden"):
        ext.lstm_segment_step_cuda(fstate, io, config)


@pytest.mark.parametrize("bad", ["float64", "cpu", "size"])
def test_binding_names_losses(bad):
    """A bad losses tensor is refused naming segment.losses, and nothing is written."""
    ext = backends.extension()
    m = fptt_fast.FPTTLSTM(2, 8, 1, backend="cuda", device=DEV)
    x, y = torch.randn(3, 2, 2, device=DEV), torch.randn(2, 1, device=DEV)
    state = (torch.randn(2, 8, device=DEV), torch.randn(2, 8, device=DEV))
    fstate, io, config = _binding_args(m, x, y, state)
    io.losses = {"float64": torch.empty(1, dtype=torch.float64, device=DEV),
                 "cpu": torch.empty(1),
                 "size": torch.empty(2, device=DEV)}[bad]
    before = [p.detach().clone() for p in m.fptt_parameters()]
    with pytest.raises(RuntimeError, match=r"segment\.losses"):
        ext.lstm_segment_step_cuda(fstate, io, config)
    assert all(torch.equal(a, p) for a, p in zip(before, m.fptt_parameters()))
