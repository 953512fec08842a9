"""Why does the authors' Add loop leave the plateau earlier than fptt_fast's? An ablation of
its three differences, one at a time, with the regulariser off (as their loop) on the fused
cpu segment step: which segments are trained (the first K-1 of T//K steps, or all K of
ceil(T/K)), the segment weights (p + 1/K, i.e. 0.1 ... 8.1, or (p+1)/K) and the head's
initial weight (xavier_normal_, or nn.Linear's uniform).

    python benchmarks/add_ablation.py --T 100 --hidden 32 --batch 64 --lr 1e-2 --steps 300 \\
        --seeds 0 1 2 3 4 --out results.csv

Prints, per variant, the test MSE (1000 fixed sequences) at every evaluation: mean, then
each seed; writes every evaluation to --out.
"""
import argparse
import csv
import time

import torch

import fptt_fast
from fptt_fast import reference, tasks

VARIANTS = {  # name: (authors' segments, authors' weights, xavier head)
    "authors": (True, True, True),
    "authors-uniform-head": (True, True, False),
    "authors-linear-weights": (True, False, True),
    "authors-all-segments": (False, True, True),
    "segments (off)": (False, False, False),
}


def run(variant, seed, a):
    authors_segs, authors_weights, xavier = VARIANTS[variant]
    torch.manual_seed(seed)
    m = fptt_fast.FPTTLSTM(2, a.hidden, 1, lr=a.lr, alpha=0.0, clip=1.0, backend="cpu")
    if xavier:
        with torch.no_grad():
            torch.nn.init.xavier_normal_(m.head.weight)
    K = a.K
    if authors_segs:
        step = a.T // K
        bounds = [(p * step, (p + 1) * step) for p in range(K - 1)]
    else:
        bounds = reference.segment_bounds(a.T, K)
    gen = torch.Generator().manual_seed(seed + 2**62)
    x_test, y_test = tasks.add_task(a.T, 1000, torch.Generator().manual_seed(2**63 + 271828))
    out = []
    t0 = time.perf_counter()
    for b in range(1, a.steps + 1):
        x, y = tasks.add_task(a.T, a.batch, gen)
        state = None
        for p, (lo, hi) in enumerate(bounds):
            weight = p + 1 / K if authors_weights else (p + 1) / K
            _, state = m.train_segment(x[lo:hi], y, state, weight=weight)
        if b % a.eval_every == 0:
            with torch.no_grad():
                pred, _ = m(x_test)
                mse = torch.nn.functional.mse_loss(pred[-1], y_test).item()
            out.append((b, mse, time.perf_counter() - t0))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows = []
    for v in a.variants:
        results = {s: run(v, s, a) for s in a.seeds}
        steps = [r[0] for r in results[a.seeds[0]]]
        cells = []
        for i, t in enumerate(steps):
            vals = [results[s][i][1] for s in a.seeds]
            cells.append(f"{t}: {sum(vals) / len(vals):.4f} ({', '.join(f'{x:.3f}' for x in vals)})")
        print(f"{v}: " + "; ".join(cells), flush=True)
        rows += [(v, s, t, mse, wall) for s in a.seeds for t, mse, wall in results[s]]
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["variant", "seed", "step", "test_mse", "elapsed_s"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
