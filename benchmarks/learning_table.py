"""The learning result of a `fptt-fast compare` folder, from its runs' log.csv files (so
runs resumed to more batches with `fptt-fast train --resume` count in full): a markdown
table per variant of the test metric at chosen steps (mean over seeds, then each seed), how
many seeds end below a threshold and the wall time; optionally the evaluations as one CSV
and the figure (mean and range over seeds).

    python benchmarks/learning_table.py runs/add-compare-T500 --steps 500 1000 2000 \\
        --csv table.csv --plot table.png --title "Add T=500 ..."
"""
import argparse
import csv
import glob
import os
import re

from fptt_fast.train import plot_variants


def read_runs(folder):
    """{variant: {seed: history}} with history rows (step, train_loss, metric, elapsed) and
    the metric's name; variants in the order of the compare's summary.csv if present."""
    runs, metric = {}, None
    for path in sorted(glob.glob(os.path.join(folder, "*", "seed*", "log.csv"))):
        variant, seed = path.split(os.sep)[-3], int(re.sub(r"\D", "", path.split(os.sep)[-2]))
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        metric = [k for k in rows[0] if k not in ("step", "train_loss", "elapsed_s")][0]
        runs.setdefault(variant, {})[seed] = [
            (int(r["step"]), float(r["train_loss"]), float(r[metric]) if r[metric] else None,
             float(r["elapsed_s"])) for r in rows]
    summary = os.path.join(folder, "summary.csv")
    if os.path.exists(summary):
        with open(summary, newline="") as f:
            order = list(dict.fromkeys(r["variant"] for r in csv.DictReader(f)))
        runs = {v: runs[v] for v in order if v in runs}
    return runs, metric


def _first_below(history, threshold, last) -> str:
    """The first evaluated step <= last whose metric is below threshold, or '-'."""
    return next((str(r[0]) for r in history if r[2] is not None and r[0] <= last and r[2] < threshold), "-")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the folder of a fptt-fast compare with several seeds")
    ap.add_argument("--steps", type=int, nargs="+", required=True, help="steps to show")
    ap.add_argument("--below", type=float, default=0.05, help="threshold counted per column")
    ap.add_argument("--first", type=float, nargs="*", default=[],
                    help="also, per threshold, each seed's first evaluated step below it (up to the "
                         "last step shown; '-' if none): when a run left the plateau, when it "
                         "reached the target")
    ap.add_argument("--csv", help="write every evaluation of every run here")
    ap.add_argument("--plot", help="write the figure here")
    ap.add_argument("--title", default="", help="the figure's title")
    args = ap.parse_args()
    runs, metric = read_runs(args.folder)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    print(f"| variant | " + " | ".join(f"{metric} @ {t}: mean (seeds {', '.join(map(str, seeds))})"
                                        for t in args.steps)
          + f" | seeds < {args.below:g} by step {', '.join(map(str, args.steps))} | "
          + "".join(f"first step < {b:g} (each seed) | " for b in args.first)
          + "wall per 1000 batches (s) |")
    print("|---" * (len(args.steps) + 3 + len(args.first)) + "|")
    for variant, by_seed in runs.items():
        cells, counts = [], []
        for t in args.steps:
            vals = [dict((r[0], r[2]) for r in h).get(t) for h in by_seed.values()]
            if any(v is None for v in vals):
                cells.append("n/a")
                counts.append("n/a")
                continue
            cells.append(f"{sum(vals) / len(vals):.4f} ({', '.join(f'{x:.4f}' for x in vals)})")
            # reached: at any evaluation up to step t
            counts.append(str(sum(min(r[2] for r in h if r[2] is not None and r[0] <= t) < args.below
                                  for h in by_seed.values())))
        firsts = [", ".join(_first_below(h, b, args.steps[-1]) for h in by_seed.values())
                  for b in args.first]
        walls = [h[-1][3] / h[-1][0] * 1000 for h in by_seed.values()]
        print(f"| {variant} | " + " | ".join(cells) + f" | {' / '.join(counts)} of {len(by_seed)} | "
              + "".join(f"{f} | " for f in firsts) + f"{min(walls):.0f}-{max(walls):.0f} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["variant", "seed", "step", "train_loss", metric, "elapsed_s"])
            for variant, by_seed in runs.items():
                for seed, h in sorted(by_seed.items()):
                    w.writerows([variant, seed, *r] for r in h if r[2] is not None)
    if args.plot:
        plot_variants(args.plot, {v: list(by_seed.values()) for v, by_seed in runs.items()},
                      metric, args.title)


if __name__ == "__main__":
    main()
