"""Segment steps on the shapes of ../shared/PERFORMANCE.md: one FPTT update of an
LSTM over a segment of omega steps, B sequences.

Variants, all in the same run:
  authors       the reference as the authors write it: nn.LSTM (cuDNN on a GPU),
                Python-loop regulariser in the loss, clip_grad_norm_, torch Adam,
                Python post-update
  authors_fused the same with torch.optim.Adam(fused=True)            (GPU)
  authors_graph the same captured in one CUDA graph                  (GPU)
  lstm_only     nn.LSTM forward + backward alone, no update
  dropin_<b>    nn.LSTM + head, loss, backward, then fptt_fast.FPTT(backend=b).step():
                the model-agnostic drop-in path
  fused_<b>     fptt_fast.FPTTLSTM(...).train_segment (when available)
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast
from fptt_fast import backends

from authors_reference import AuthorsFPTT
from conftest import DEVICE, QUICK, measure

# name: (I, H, O, B, omega, loss)
CONFIGS = {
    "add_H128_w100": (2, 128, 1, 128, 100, "mse"),
    "add_H128_w1": (2, 128, 1, 128, 1, "mse"),
    "smnist_H128_w98": (1, 128, 10, 128, 98, "ce"),
    "wide_H512_w10": (32, 512, 10, 64, 10, "ce"),
}
if QUICK:
    CONFIGS = {"add_H128_w100": (2, 128, 1, 128, 100, "mse"), "add_H128_w1": (2, 128, 1, 128, 1, "mse")}

FUSED_BACKENDS = [b for b in ("cpu", "triton", "cuda")
                  if backends.unavailable_reason(b, DEVICE) is None and not (b == "triton" and DEVICE == "cpu")]
VARIANTS = ["authors", "lstm_only"] + [f"dropin_{b}" for b in FUSED_BACKENDS]
if DEVICE == "cuda":
    VARIANTS += ["authors_fused", "authors_graph"]
if hasattr(fptt_fast, "FPTTLSTM"):
    VARIANTS += [f"fused_{b}" for b in ["reference"] + FUSED_BACKENDS]


class Net(nn.Module):
    def __init__(self, I, H, O):
        super().__init__()
        self.rnn, self.head = nn.LSTM(I, H), nn.Linear(H, O)

    def forward(self, x, state):
        _, (h, c) = self.rnn(x, state)
        return self.head(h[0])


def data(I, H, O, B, omega, loss):
    x = torch.randn(omega, B, I, device=DEVICE)
    y = torch.randn(B, O, device=DEVICE) if loss == "mse" else torch.randint(0, O, (B,), device=DEVICE)
    h0 = (torch.randn(1, B, H, device=DEVICE) * 0.1, torch.randn(1, B, H, device=DEVICE) * 0.1)
    lossf = (lambda out: F.mse_loss(out, y)) if loss == "mse" else (lambda out: F.cross_entropy(out, y))
    return x, y, h0, lossf


def make(variant, I, H, O, B, omega, loss):
    x, y, h0, lossf = data(I, H, O, B, omega, loss)
    if variant.startswith("fused_"):
        m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, lr=1e-3, clip=1.0, backend=variant[6:], device=DEVICE)
        state = (h0[0][0], h0[1][0])
        return lambda: m.train_segment(x, y, state=state)
    net = Net(I, H, O).to(DEVICE)
    if variant == "lstm_only":
        def step():
            net.zero_grad()
            lossf(net(x, h0)).backward()
        return step
    if variant.startswith("dropin_"):
        opt = fptt_fast.FPTT(net.parameters(), lr=1e-3, clip=1.0, backend=variant[7:])

        def step():
            opt.zero_grad(set_to_none=False)
            lossf(net(x, h0)).backward()
            opt.step()
        return step
    authors = AuthorsFPTT(net.parameters(), lr=1e-3, clip=1.0, fused=variant == "authors_fused",
                          capturable=variant == "authors_graph")

    def step():
        authors.opt.zero_grad(set_to_none=False)
        authors.finish(lossf(net(x, h0)))
    if variant != "authors_graph":
        return step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", list(CONFIGS))
def bench_segment(benchmark, config, variant):
    I, H, O, B, omega, loss = CONFIGS[config]
    torch.manual_seed(0)
    step = make(variant, I, H, O, B, omega, loss)
    slow = DEVICE == "cpu" and omega > 10
    inner = 1 if slow else (10 if DEVICE == "cuda" else 3)
    rounds = 3 if QUICK else 20
    measure(benchmark, step, inner, rounds, group=f"segment-{config}", name=variant,
            I=I, H=H, O=O, B=B, omega=omega)
