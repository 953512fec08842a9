"""FPTTLSTM's nn.LSTM layouts, batch_first and num_layers, against nn.LSTM(batch_first=True,
num_layers=L) + nn.Linear trained per segment by the reference FPTT: the same parameters
after 20 updates (one, two and three layers: reference, cpu, triton in the interpreter,
cuda on a GPU); batch-first outputs; errors in the caller's layout."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast

from .utils import TOL_UPDATE, backend_device, interpreted, scaled_err

I, H, O, B = 3, 9, 2, 5


def torch_twin(m):
    """nn.LSTM(batch_first=True, num_layers=m's) + nn.Linear, loaded into m (whose FPTT
    state starts afresh), and their reference FPTT."""
    dev = m.weight_hh_l0.device
    lstm = nn.LSTM(I, H, batch_first=True, num_layers=m.num_layers, device=dev)
    head = nn.Linear(H, O, device=dev)
    m.load_lstm_state_dict(lstm.state_dict(), head=head.state_dict())
    params = [*lstm.parameters(), *head.parameters()]
    return lstm, head, fptt_fast.FPTT(params, backend="reference", **OPT)


OPT = dict(optimizer="sgd", lr=0.05, momentum=0.5, alpha=0.3, clip=1.0)


@pytest.mark.parametrize("backend,layers", [("reference", 1), ("cpu", 1), ("triton", 1), ("cuda", 1),
                                            ("reference", 2), ("cpu", 2), ("triton", 2),
                                            ("cuda", 2), ("auto", 3)])
@pytest.mark.parametrize("per_step", [False, True])
def test_matches_nn_lstm_batch_first_stacked(backend, layers, per_step, fresh_seed):
    dev = backend_device(backend, "lstm") if backend != "auto" else "cpu"
    m = fptt_fast.FPTTLSTM(I, H, O, per_step=per_step, batch_first=True, backend=backend,
                           device=dev, num_layers=layers, **OPT)
    assert m.backend == ("cpu" if backend == "auto" else backend)  # a stack: layer launches
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
        top = state[0] if layers == 1 else state[0][-1]
        assert state[0].shape == ((B, H) if layers == 1 else (layers, B, H))
        assert torch.allclose(top, twin_state[0][-1], atol=1e-4)
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
    with pytest.raises(ValueError, match=r"target must have shape \[B, omega, O\] = \[5, 4, 2\] "
                                         r"\(batch_first=True\), got \(4, 5, 2\)"):
        bf.train_segment(torch.randn(B, 4, I), torch.randn(4, B, O))
    with pytest.raises(ValueError, match=r"= \[5, 4, 2\] \(batch_first=True\), got \(5, 4, 3\)"):
        bf.train_segment(torch.randn(B, 4, I), torch.randn(B, 4, O + 1))
    with pytest.raises(ValueError, match="per-step segments weigh 1"):
        bf.train_sequence(torch.randn(B, 4, I), torch.randn(B, 4, O), 2, weights="authors")
    with pytest.raises(ValueError, match=r"batch-first \[B >= 1, omega >= 1, I=3\]"):
        bf(torch.randn(B, 4))
    with pytest.raises(ValueError, match="batch_first must be True or False"):
        fptt_fast.FPTTLSTM(I, H, O, batch_first=1)


def test_stacked_refusals_name_the_way():
    """A one-layer state or state dict for two layers, a three-layer state dict for two:
    errors naming what is wrong."""
    m = fptt_fast.FPTTLSTM(I, H, O, num_layers=2)
    with pytest.raises(ValueError, match=r"state h must have shape \[L=2, B=5, H=9\]"):
        m.train_segment(torch.randn(4, B, I), torch.randn(B, O), (torch.zeros(B, H), torch.zeros(B, H)))
    with pytest.raises(ValueError, match="misses 'weight_ih_l1'"):
        m.load_lstm_state_dict(nn.LSTM(I, H).state_dict())
    with pytest.raises(ValueError, match="unexpected keys .*weight_ih_l2"):
        m.load_lstm_state_dict(nn.LSTM(I, H, num_layers=3).state_dict())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
            fptt_fast.FPTTLSTM(I, H, O, num_layers=bad)


def test_reference_lstm_stacked_is_nn_lstm_and_torchs_fused_path(fresh_seed):
    """reference.ReferenceLSTM(num_layers=2): nn.LSTM's outputs and states from nn.LSTM's
    weights, by its own math and through torch's fused LSTM (the BPTT baseline's)."""
    torch.manual_seed(fresh_seed)
    lstm = nn.LSTM(I, H, num_layers=2)
    ours = fptt_fast.reference.ReferenceLSTM(I, H, num_layers=2)
    ours.load_state_dict(lstm.state_dict())
    x = torch.randn(7, B, I)
    state = (torch.randn(2, B, H), torch.randn(2, B, H))
    want, (h, c) = lstm(x, state)
    for fused in (False, True):
        ours.torch_lstm = fused
        got, (gh, gc) = ours(x, state)
        for a, b in ((got, want), (gh, h), (gc, c)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
