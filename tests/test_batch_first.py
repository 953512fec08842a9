"""FPTTLSTM(batch_first=True) against nn.LSTM(batch_first=True) + nn.Linear trained per
segment by the reference FPTT: the same parameters after 20 updates, on reference, cpu
and triton (the interpreter on a CPU); batch-first outputs; errors in the caller's layout."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast

from .utils import FUSED, TOL_UPDATE, backend_device, interpreted, scaled_err

I, H, O, B = 3, 9, 2, 5


def torch_twin(m):
    """nn.LSTM(batch_first=True) + nn.Linear, loaded into m (whose FPTT state starts
    afresh), and their reference FPTT."""
    dev = m.weight_hh_l0.device
    lstm, head = nn.LSTM(I, H, batch_first=True, device=dev), nn.Linear(H, O, device=dev)
    m.load_lstm_state_dict(lstm.state_dict(), head=head.state_dict())
    params = [*lstm.parameters(), *head.parameters()]
    return lstm, head, fptt_fast.FPTT(params, backend="reference", **OPT)


OPT = dict(optimizer="sgd", lr=0.05, momentum=0.5, alpha=0.3, clip=1.0)


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("per_step", [False, True])
def test_batch_first_matches_nn_lstm_batch_first(backend, per_step, fresh_seed):
    dev = backend_device(backend, "lstm")
    m = fptt_fast.FPTTLSTM(I, H, O, per_step=per_step, batch_first=True, backend=backend,
                           device=dev, **OPT)
    lstm, head, opt = torch_twin(m)
    n_updates = 4 if interpreted(backend) else 20
    state, twin_state = None, None
    for k in range(n_updates):
        omega = 1 + k % 4
        x = torch.randn(B, omega, I, device=dev)
        y = torch.randn(B, omega, O, device=dev) if per_step else torch.randn(B, O, device=dev)
        weight = 0.5 + k % 3
        loss, state = m.train_segment(x, y, state, weight=weight)
        out, (h, c) = lstm(x, twin_state)
        pred = head(out) if per_step else head(out[:, -1])
        want = F.mse_loss(pred, y)
        opt.zero_grad()
        (weight * want).backward()
        opt.step()
        twin_state = (h.detach(), c.detach())
        assert abs(loss.item() - want.item()) <= 1e-4 * max(1.0, want.item())
        assert torch.allclose(state[0], twin_state[0][0], atol=1e-4)
    theirs = [*lstm.parameters(), *head.parameters()]
    scale = max(p.abs().max().item() for p in theirs)
    for p, q in zip(m.fptt_parameters(), theirs):
        assert scaled_err(p, q, scale) <= TOL_UPDATE


def test_batch_first_forward_and_sequence_layouts(fresh_seed):
    """forward returns [B, omega, O]; train_sequence on [B, T, I] equals the time-major
    module's on the transposed batch, bitwise."""
    torch.manual_seed(fresh_seed)
    a = fptt_fast.FPTTLSTM(I, H, O, per_step=True, batch_first=True, backend="cpu")
    torch.manual_seed(fresh_seed)
    b = fptt_fast.FPTTLSTM(I, H, O, per_step=True, backend="cpu")
    x, y = torch.randn(B, 12, I), torch.randn(B, 12, O)
    out, _ = a(x)
    assert out.shape == (B, 12, O)
    assert torch.equal(out, b(x.transpose(0, 1))[0].transpose(0, 1))
    la = a.train_sequence(x, y, 3)
    lb = b.train_sequence(x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous(), 3)
    assert torch.equal(la, lb)
    for p, q in zip(a.fptt_parameters(), b.fptt_parameters()):
        assert torch.equal(p, q)


def test_layout_errors_speak_the_callers_layout():
    m = fptt_fast.FPTTLSTM(I, H, O, backend="cpu")
    with pytest.raises(ValueError, match="x is read time-major .* batch_first=True"):
        m.train_segment(torch.randn(B + 3, B, I), torch.randn(B + 3, O))  # batch-first x
    bf = fptt_fast.FPTTLSTM(I, H, O, per_step=True, batch_first=True, backend="cpu")
    with pytest.raises(ValueError, match=r"must start with x's \[B, omega\] = \[5, 4\]"):
        bf.train_segment(torch.randn(B, 4, I), torch.randn(4, B, O))
    with pytest.raises(ValueError, match=r"batch-first \[B >= 1, omega >= 1, I=3\]"):
        bf(torch.randn(B, 4))
    with pytest.raises(ValueError, match="batch_first must be True or False"):
        fptt_fast.FPTTLSTM(I, H, O, batch_first=1)
