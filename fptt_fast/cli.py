"""The `fptt-fast` command (also `python -m fptt_fast`).

    fptt-fast train add [--T 500 --steps 2000 ...]   FPTT (or --algo bptt) on the Add task
    fptt-fast train digits [--permute]               sequential 8x8 digits
    fptt-fast compare add --T 500                     FPTT and BPTT, same seeds and data
    fptt-fast bench                                   FPTT.step per backend vs reference

Bad input gives one line on stderr and exit code 2, before any file is written.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import backends

PROG = "fptt-fast"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage too) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")


def _run_options(p: argparse.ArgumentParser, algo: bool) -> None:
    """Options shared by train and compare. Defaults are None: "not given" (see
    train.make_config: task defaults, --paper, or the checkpoint fill them in)."""
    p.add_argument("task", help="add or digits")
    p.add_argument("--T", type=int, help="sequence length (digits: 64)")
    p.add_argument("--K", type=int, help="FPTT segments per sequence")
    p.add_argument("--hidden", type=int, help="LSTM hidden size")
    p.add_argument("--batch", type=int, help="sequences per batch")
    p.add_argument("--steps", type=int, help="sequence batches to train (in total, when resuming)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--alpha", type=float, help="FPTT alpha (proximal weight, dual step)")
    p.add_argument("--beta", type=float, help="FPTT beta (running-average step)")
    p.add_argument("--rho", type=float, help="FPTT rho (0: authors' code, 0.5: paper's Alg. 1)")
    p.add_argument("--clip", type=float, help="global gradient-norm clip (0: none)")
    if algo:
        p.add_argument("--algo", help="fptt (default) or bptt")
    p.add_argument("--seed", type=int, help="seed of the model and the training batches")
    p.add_argument("--backend", help="FPTT backend: auto (default), reference, cpu, triton, cuda")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evaluations")
    p.add_argument("--permute", action="store_const", const=True,
                   help="digits: fixed seeded pixel permutation")
    p.add_argument("--paper", action="store_true",
                   help="the paper's Add settings: H=128, Adam 1e-3, alpha=beta=0.5, clip 1, batch 128, "
                        "T=1000, K=10 (options given override them)")
    p.add_argument("--out", help="output folder (default runs/<task>-<algo>-T<T>)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and the fused kernels (default 1: the per-step "
                        "matrix products are small; a 2nd thread mostly adds synchronisation, and "
                        "on a busy machine spinning OpenMP threads slow it by 10x or more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="FPTT training with fused kernels (fptt_fast).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train an LSTM with FPTT (or BPTT) on a task")
    _run_options(t, algo=True)
    t.add_argument("--save", help="checkpoint path (default OUT/checkpoint.pt); written at each "
                                  "evaluation and at the end, atomically")
    t.add_argument("--resume", help="continue the run of this checkpoint (bitwise identically)")
    c = sub.add_parser("compare", help="FPTT and BPTT on the same seeds and data, one figure")
    _run_options(c, algo=False)
    b = sub.add_parser("bench", help="FPTT.step throughput per backend vs the reference")
    b.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    b.add_argument("--budget", type=float, default=0.6, help="seconds per measurement (default 0.6)")
    return parser


def _given(args) -> dict:
    keys = ("T", "K", "hidden", "batch", "steps", "lr", "alpha", "beta", "rho", "clip", "algo",
            "seed", "backend", "device", "eval_every", "permute")
    return {k: getattr(args, k, None) for k in keys}


def _default_out(cfg, kind: str) -> str:
    task = cfg.task + ("-permuted" if cfg.permute else "")
    return os.path.join("runs", f"{task}-{kind}-T{cfg.T}")


def _backend_line(run) -> str:
    cfg = run.cfg
    if cfg.algo == "bptt":
        return f"algo: bptt ({run.backend}, clip {cfg.clip:g}); device {run.device}"
    avail = [b for b, why in backends.available(run.device.type).items() if why is None]
    return (f"backend: {run.backend} (requested {cfg.backend}; available on {run.device.type}: "
            f"{', '.join(avail)}); device {run.device}")


def _final_line(run) -> str:
    step, loss, test = run.final()
    loss_s = "n/a" if loss is None else f"{loss:.5g}"
    return (f"final [{run.cfg.algo}]: step {step}  train_loss {loss_s}  {run.task.metric} {test:.5g}  "
            f"({run.elapsed:.1f} s)")


def cmd_train(args) -> int:
    from .train import Run, UsageError, load_checkpoint, make_config

    ckpt = None
    if args.resume:
        if args.paper:
            raise UsageError("--paper cannot be combined with --resume (the checkpoint fixes the settings)")
        ckpt = load_checkpoint(args.resume)
    cfg = make_config(args.task, _given(args), paper=args.paper, checkpoint=ckpt)
    run = Run(cfg, ckpt)
    out = args.out or _default_out(cfg, cfg.algo)
    print(cfg.describe() + (f"  (resumed at step {run.step})" if ckpt else ""))
    print(_backend_line(run))
    run.fit(out, save_path=args.save, progress=not args.no_progress)
    print(_final_line(run))
    save = args.save or os.path.join(out, "checkpoint.pt")
    print(f"wrote {os.path.join(out, 'log.csv')}, {os.path.join(out, 'loss.png')}, {save}")
    return 0


def cmd_compare(args) -> int:
    from .train import Run, make_config, plot_curves, write_compare_csv

    runs = {}
    for algo in ("fptt", "bptt"):  # build (and validate) both before writing anything
        cfg = make_config(args.task, {**_given(args), "algo": algo}, paper=args.paper)
        runs[algo] = Run(cfg)
    cfg = runs["fptt"].cfg
    out = args.out or _default_out(cfg, "compare")
    print(cfg.describe().replace(" fptt ", " fptt vs bptt "))
    for algo, run in runs.items():
        print(_backend_line(run))
        run.fit(os.path.join(out, algo), progress=not args.no_progress)
    metric = runs["fptt"].task.metric
    write_compare_csv(os.path.join(out, "compare.csv"), {a: r.history for a, r in runs.items()}, metric)
    plot_curves(os.path.join(out, "compare.png"), {a: r.history for a, r in runs.items()}, metric,
                cfg.describe().replace(" fptt ", " FPTT vs BPTT "))
    for run in runs.values():
        print(_final_line(run))
    print(f"wrote {os.path.join(out, 'compare.csv')}, {os.path.join(out, 'compare.png')}")
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .train import UsageError

    if not args.budget > 0:
        raise UsageError(f"budget must be positive, got {args.budget}")
    bench.main(args.device, args.budget)
    return 0


def main(argv=None) -> int:
    from .train import UsageError

    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"threads must be positive, got {args.threads}")
            torch.set_num_threads(args.threads)
        return {"train": cmd_train, "compare": cmd_compare, "bench": cmd_bench}[args.command](args)
    except UsageError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a training run's checkpoint is the one of its last evaluation)",
              file=sys.stderr)
        return 130
