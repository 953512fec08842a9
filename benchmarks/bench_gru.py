"""FPTTGRU's segment step against nn.GRU with fptt_fast.FPTT as the optimiser, in one run
(pytest-benchmark groups gru-<config>): one FPTT update of a GRU + linear head over a
segment of omega steps, B sequences.

  gru_only      nn.GRU + head forward and backward alone, no update (the floor)
  dropin_<b>    nn.GRU + head, loss, backward, then fptt_fast.FPTT(backend=b).step()
  fused_<b>     fptt_fast.FPTTGRU(...).train_segment
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast
from fptt_fast import backends

from conftest import DEVICE, QUICK, measure

# name: (I, H, O, B, omega)
CONFIGS = {"add_H128_w20": (2, 128, 1, 128, 20), "add_H32_w1": (2, 32, 1, 32, 1)}
if not QUICK:
    CONFIGS.update({"add_H128_w100": (2, 128, 1, 128, 100), "wide_H512_w10": (32, 512, 1, 64, 10)})
BACKENDS = [b for b in ("cpu", "triton")
            if backends.segment_unavailable_reason(b, DEVICE, fptt_fast.gru.GRU) is None
            and not (b == "triton" and DEVICE == "cpu")]
VARIANTS = ["gru_only"] + [f"dropin_{b}" for b in BACKENDS] + [f"fused_{b}" for b in
                                                                ["reference"] + BACKENDS]


def make(variant, I, H, O, B, omega):
    x = torch.randn(omega, B, I, device=DEVICE)
    y = torch.randn(B, O, device=DEVICE)
    h0 = torch.randn(B, H, device=DEVICE) * 0.1
    if variant.startswith("fused_"):
        m = fptt_fast.FPTTGRU(I, H, O, lr=1e-3, clip=1.0, backend=variant[6:], device=DEVICE)
        return lambda: m.train_segment(x, y, h0)
    gru, head = nn.GRU(I, H, device=DEVICE), nn.Linear(H, O, device=DEVICE)
    params = [*gru.parameters(), *head.parameters()]
    opt = (fptt_fast.FPTT(params, lr=1e-3, clip=1.0, backend=variant[7:])
           if variant.startswith("dropin_") else None)

    def step():
        for p in params:
            p.grad = None
        _, h = gru(x, h0[None])
        F.mse_loss(head(h[0]), y).backward()
        if opt is not None:
            opt.step()
    return step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", list(CONFIGS))
def bench_gru(benchmark, config, variant):
    I, H, O, B, omega = CONFIGS[config]
    torch.manual_seed(0)
    step = make(variant, I, H, O, B, omega)
    measure(benchmark, step, 1 if omega > 10 else 3, 3 if QUICK else 20, group=f"gru-{config}",
            name=variant, I=I, H=H, O=O, B=B, omega=omega)
