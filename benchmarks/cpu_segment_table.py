"""One FPTT segment step on the CPU, every shape of the omega x H x B grid, all variants
in one run (so the ratios are of the same machine state): a markdown table to stdout.

    python benchmarks/cpu_segment_table.py --threads 1 [--budget 0.3] [--quick | --batches]

Variants (each: one update of an LSTM(I=2, H) + Linear(H, 1) head over a segment of omega
steps, B sequences, MSE on the last step, Adam 1e-3, clip 1):
  fused_cpu   fptt_fast.FPTTLSTM(backend="cpu").train_segment: one C++ call
  fused_ref   FPTTLSTM(backend="reference"): autograd through the reference math + FPTT
  authors     the authors' pattern on nn.LSTM (oneDNN): regulariser in the loss, backward,
              clip_grad_norm_, torch Adam, Python post-update (authors_reference.py)
  lstm_only   nn.LSTM + head forward and backward alone (no update): a floor
  bptt        BPTT on nn.LSTM over the segment: forward, backward, clip, torch Adam
              (no regulariser; pytest-benchmark grid only, bench_cpu_grid.py)
Each time is the median over rounds of the per-call mean, a round lasting about --budget s.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fptt_fast  # noqa: E402
from authors_reference import AuthorsFPTT  # noqa: E402

OMEGAS, HIDDENS, BATCHES = (1, 20, 100), (32, 128, 512), (32, 128)


def make(variant, H, B, omega):
    x, y = torch.randn(omega, B, 2), torch.randn(B, 1)
    if variant.startswith("fused_"):
        m = fptt_fast.FPTTLSTM(2, H, 1, lr=1e-3, clip=1.0,
                               backend={"fused_cpu": "cpu", "fused_ref": "reference"}[variant])
        return lambda: m.train_segment(x, y)
    lstm, head = nn.LSTM(2, H), nn.Linear(H, 1)
    params = [*lstm.parameters(), *head.parameters()]

    def loss():
        out, _ = lstm(x)
        return F.mse_loss(head(out[-1]), y)
    if variant == "lstm_only":
        def step():
            for p in params:
                p.grad = None
            loss().backward()
        return step
    if variant == "bptt":
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=False)
            loss().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return step
    authors = AuthorsFPTT(params, lr=1e-3, clip=1.0)

    def step():
        authors.opt.zero_grad(set_to_none=False)
        authors.finish(loss())
    return step


def make_batch(variant, H, B, T, K):
    """One batch of T steps: FPTT over K segments (fused_cpu: train_sequence; authors: their
    pattern per segment, state carried detached), or one BPTT step (nn.LSTM, Adam, clip)."""
    x, y = torch.randn(T, B, 2), torch.randn(B, 1)
    if variant == "fused_cpu":
        m = fptt_fast.FPTTLSTM(2, H, 1, lr=1e-3, clip=1.0, backend="cpu")
        return lambda: m.train_sequence(x, y, K)
    lstm, head = nn.LSTM(2, H), nn.Linear(H, 1)
    params = [*lstm.parameters(), *head.parameters()]
    if variant == "bptt":
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=False)
            out, _ = lstm(x)
            F.mse_loss(head(out[-1]), y).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return step
    authors = AuthorsFPTT(params, lr=1e-3, clip=1.0)
    bounds = fptt_fast.reference.segment_bounds(T, K)

    def step():
        state = None
        for p, (a, b) in enumerate(bounds):
            authors.opt.zero_grad(set_to_none=False)
            out, state = lstm(x[a:b], state)
            authors.finish((p + 1) / K * F.mse_loss(head(out[-1]), y))
            state = (state[0].detach(), state[1].detach())
    return step


def time_call(fn, budget, rounds=5):
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, int(budget / max(one, 1e-6)))
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        means.append((time.perf_counter() - t0) / inner)
    return statistics.median(means)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per round")
    ap.add_argument("--quick", action="store_true", help="omega 20, H 128, B 128 only")
    ap.add_argument("--batches", action="store_true",
                    help="instead: whole batches, T=1000, H=128, B=128, K in (10, 1000), against one "
                         "BPTT step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    if a.batches:
        print(f"torch {torch.__version__}, {a.threads} thread(s); ms per batch of T=1000, H=128, B=128")
        print("| K | fused_cpu | authors | bptt (one step) | fused_cpu / bptt |")
        print("|---|---|---|---|---|")
        for K in (10, 1000):
            torch.manual_seed(0)
            t = {v: time_call(make_batch(v, 128, 128, 1000, K), a.budget, rounds=3)
                 for v in ("fused_cpu", "authors", "bptt")}
            print(f"| {K} | " + " | ".join(f"{t[v] * 1e3:.1f}" for v in ("fused_cpu", "authors", "bptt"))
                  + f" | {t['fused_cpu'] / t['bptt']:.2f} |", flush=True)
        return
    variants = ("fused_cpu", "fused_ref", "authors", "lstm_only")
    grid = [(20, 128, 128)] if a.quick else [(w, h, b) for w in OMEGAS for h in HIDDENS for b in BATCHES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs; ms per segment step")
    print("| omega | H | B | " + " | ".join(variants) + " | fused_cpu / min(fused_ref, authors) |")
    print("|---|---|---|" + "---|" * (len(variants) + 1))
    for omega, H, B in grid:
        torch.manual_seed(0)
        t = {v: time_call(make(v, H, B, omega), a.budget) for v in variants}
        ratio = t["fused_cpu"] / min(t["fused_ref"], t["authors"])
        print(f"| {omega} | {H} | {B} | " + " | ".join(f"{t[v] * 1e3:.3f}" for v in variants)
              + f" | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
