"""A markdown table of a `fptt-fast compare` run's summary.csv: per variant, the test
metric (mean over seeds, and each seed) at chosen steps, how many seeds end below a
threshold, and the wall time per run.

    python benchmarks/learning_table.py runs/add-compare-T500/summary.csv --steps 500 1000 2000
"""
import argparse
import csv
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="summary.csv written by fptt-fast compare")
    ap.add_argument("--steps", type=int, nargs="+", help="steps to show (default: every evaluation)")
    ap.add_argument("--below", type=float, default=0.05, help="threshold counted at the last step")
    args = ap.parse_args()
    with open(args.summary, newline="") as f:
        rows = list(csv.DictReader(f))
    metric = [k for k in rows[0] if k not in ("variant", "seed", "step", "train_loss", "elapsed_s")][0]
    runs = defaultdict(dict)  # (variant, seed) -> {step: (metric, elapsed)}
    for r in rows:
        runs[(r["variant"], int(r["seed"]))][int(r["step"])] = (float(r[metric]), float(r["elapsed_s"]))
    variants = list(dict.fromkeys(v for v, _ in runs))
    seeds = sorted({s for _, s in runs})
    steps = args.steps or sorted({t for h in runs.values() for t in h})
    last = max(steps)
    print(f"| variant | " + " | ".join(f"{metric} @ {t}: mean (seeds {', '.join(map(str, seeds))})"
                                        for t in steps)
          + f" | seeds < {args.below:g} @ {last} | wall per run (s) |")
    print("|---" * (len(steps) + 3) + "|")
    for v in variants:
        cells = []
        for t in steps:
            vals = [runs[(v, s)][t][0] for s in seeds if t in runs[(v, s)]]
            cells.append(f"{sum(vals) / len(vals):.4f} ({', '.join(f'{x:.4f}' for x in vals)})"
                         if vals else "n/a")
        ends = [runs[(v, s)][last][0] for s in seeds if last in runs[(v, s)]]
        walls = [runs[(v, s)][last][1] for s in seeds if last in runs[(v, s)]]
        wall = f"{min(walls):.0f}-{max(walls):.0f}" if walls else "n/a"
        print(f"| {v} | " + " | ".join(cells)
              + f" | {sum(x < args.below for x in ends)} of {len(ends)} | {wall} |")


if __name__ == "__main__":
    main()
