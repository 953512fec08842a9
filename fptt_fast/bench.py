"""`fptt-fast bench`: how fast is one FPTT update (fptt_fast.FPTT.step) here?

Times step() alone (gradients are fixed tensors, no model runs), per available backend,
on the parameter shapes of two LSTM+head models, and prints µs per step and the
speed-up over the reference backend (plain PyTorch). Quick: a fixed time budget per
measurement, well under 30 s in all on a CPU.
"""
from __future__ import annotations

import time

import torch

from . import backends
from .optim import FPTT

# (label, LSTM input size, hidden size, head outputs)
SIZES = (("LSTM I=2 H=128 +head", 2, 128, 1), ("LSTM I=128 H=512 +head", 128, 512, 10))
BUDGET_S = 0.6   # per (size, backend): enough for a stable median on a CPU
REPEATS = 5


def lstm_shapes(i, h, o):
    return [(4 * h, i), (4 * h, h), (4 * h,), (4 * h,), (o, h), (o,)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(backend: str, shapes, device: torch.device, budget_s: float = BUDGET_S) -> float:
    """Median µs per FPTT.step (Adam base, clip 1.0) over REPEATS timed blocks."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).mul_(0.1).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(0.01).to(device)
    opt = FPTT(params, lr=1e-3, clip=1.0, backend=backend)
    for _ in range(2):  # warm-up: allocation, kernel compilation, caches
        opt.step()
    _sync(device)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    estimate = time.perf_counter() - t0
    per_block = max(1, int(budget_s / (REPEATS * max(estimate, 1e-7))))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(per_block):
            opt.step()
        _sync(device)
        times.append((time.perf_counter() - t0) / per_block)
    times.sort()
    return times[len(times) // 2] * 1e6


def runnable(device: torch.device) -> dict:
    """{backend: None or why it is not benchmarked}. Triton on a CPU runs in its
    interpreter only, orders of magnitude slower: a meaningless number, so left out."""
    out = backends.available(device.type)
    if device.type == "cpu" and out.get("triton") is None:
        out["triton"] = "runs on a CPU only in the Triton interpreter (not a speed measurement)"
    return out


def main(device: str = "auto", budget_s: float = BUDGET_S) -> list:
    from .train import resolve_device

    dev = resolve_device(device)
    avail = runnable(dev)
    names = [b for b, why in avail.items() if why is None]
    print(f"FPTT.step (Adam, clip 1.0) on {dev}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'size':<24}{'params':>10}  " + "".join(f"{b + ' µs':>14}{'×ref':>7}" for b in names)
    print(header)
    print("-" * len(header))
    rows = []
    for label, i, h, o in SIZES:
        shapes = lstm_shapes(i, h, o)
        n_params = sum(torch.Size(s).numel() for s in shapes)
        us = {b: time_step(b, shapes, dev, budget_s) for b in names}
        cells = "".join(f"{us[b]:>14.1f}{us['reference'] / us[b]:>7.2f}" for b in names)
        print(f"{label:<24}{n_params:>10}  {cells}")
        rows.append((label, n_params, us))
    for b, why in avail.items():
        if why is not None:
            print(f"not benchmarked: {b}: {why}")
    return rows
