"""Update-only throughput: the fused FPTT update per backend against the reference
update written as the authors write it (Python loops), fptt_fast's readable
reference, and torch's own Adam alone (fused=True on a GPU) which does less work
(no regulariser, clip, dual or running average).

Traffic counted at 44 bytes per parameter (read w, g, w_bar, lam, m, v; write w,
w_bar, lam, m, v), as ../shared/PERFORMANCE.md counts it.
"""
import pytest
import torch

import fptt_fast
from fptt_fast import backends

from authors_reference import AuthorsFPTT
from conftest import DEVICE, QUICK, measure

BYTES_PER_PARAM = 44


def lstm_shapes(I, H, O):
    return [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,), (O, H), (O,)]


SIZES = {
    "67K": lstm_shapes(2, 128, 1),        # Add task LSTM H=128
    "1.12M": lstm_shapes(32, 512, 10),    # H=512, I=32
    "50M": [(6_250_000,)] * 8,            # 50 M parameters in 8 tensors
}
if QUICK:
    SIZES.pop("50M")

VARIANTS = ["authors", "reference", "torch_adam"] + [
    b for b in ("cpu", "triton", "cuda") if backends.unavailable_reason(b, DEVICE) is None
    and not (b == "triton" and DEVICE == "cpu")]  # the interpreter is for tests, not timing


def make(size, variant):
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in SIZES[size]]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    if variant == "authors":
        opt = AuthorsFPTT(params, lr=1e-3, clip=1.0)
        return params, opt.update_only
    if variant == "torch_adam":
        kw = {"fused": True} if DEVICE == "cuda" else {"foreach": True}
        return params, torch.optim.Adam(params, lr=1e-3, **kw).step
    opt = fptt_fast.FPTT(params, lr=1e-3, clip=1.0, backend=variant)
    return params, opt.step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", list(SIZES))
def bench_update(benchmark, size, variant):
    params, step = make(size, variant)
    n = sum(p.numel() for p in params)
    big = n > 10_000_000 or (DEVICE == "cpu" and n > 1_000_000)
    inner = 1 if big else (20 if DEVICE == "cuda" else 3)
    rounds = 5 if (QUICK or big) else 30
    measure(benchmark, step, inner, rounds, group=f"update-{size}", name=variant,
            params=n, bytes_per_call=BYTES_PER_PARAM * n)
