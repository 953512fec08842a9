"""The `fptt-fast` command (also `python -m fptt_fast`): train, compare and bench.

    fptt-fast train add|digits|smnist|psmnist ...    FPTT (or --algo bptt) on a task
    fptt-fast compare add --T 500                     FPTT and BPTT, same seeds and data
    fptt-fast bench                                   FPTT.step per backend vs reference

Bad input: one line on stderr, exit code 2, before any file is written. A run never writes
over another run's files; Ctrl-C saves a checkpoint and exits with 130. Under torchrun,
train and compare run data-parallel. Design: docs/KERNELS.md#fptt_fastclipy
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import backends, train

PROG = "fptt-fast"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage too) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default: argparse's "(default: X)" for a value,
    the option's own words where it says "default" itself (the run options' defaults
    are None, "not given", and depend on the task, --paper or the checkpoint)."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _task_default(name: str) -> str:
    """'(default: add 30, digits 64; --paper: 1000) (smnist, psmnist: 784)', from
    train.DEFAULTS, PAPER and Config, so the help cannot drift from what make_config
    does. The first part is add's and digits' (--paper: add's), the second the MNIST
    tasks', shown where it differs from the first."""
    from .train import DEFAULTS, MNIST_TASKS, PAPER, Config

    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    per_task = {task: d.get(name, getattr(Config, name)) for task, d in DEFAULTS.items()}
    small = {task: v for task, v in per_task.items() if task not in MNIST_TASKS}
    if len(set(small.values())) == 1:
        text = show(small["add"])
    else:
        text = ", ".join(f"{task} {show(v)}" for task, v in small.items())
    paper = PAPER["add"].get(name)
    if paper is not None and paper != per_task["add"]:
        text += f"; --paper: {show(paper)}"
    mnist, mnist_paper = per_task[MNIST_TASKS[0]], PAPER[MNIST_TASKS[0]].get(name)
    assert all(per_task[t] == mnist and PAPER[t].get(name) == mnist_paper for t in MNIST_TASKS)
    parts = []
    if len(set(small.values())) > 1 or mnist != small["add"]:
        parts.append(show(mnist))
    if mnist_paper is not None and (mnist_paper != mnist or (parts and paper is not None
                                                             and paper != per_task["add"])):
        parts.append(f"--paper: {show(mnist_paper)}")  # said even when equal, if add's differs
    mnist_text = f" ({', '.join(MNIST_TASKS)}: {'; '.join(parts)})" if parts else ""
    return f"(default: {text}){mnist_text}"


def _run_options(p: argparse.ArgumentParser, algo: bool) -> None:
    """Options shared by train and compare. Defaults are None: "not given" (see
    train.make_config: task defaults, --paper, or the checkpoint fill them in)."""
    d = _task_default
    p.add_argument("task", nargs=None if algo else "?",
                   help="add, digits, smnist (sequential MNIST) or psmnist (permuted)" +
                        ("" if algo else "; left out with --resume"))
    p.add_argument("--T", type=int, help=f"sequence length {d('T')}")
    p.add_argument("--K", type=int, help=f"FPTT segments per sequence {d('K')}")
    p.add_argument("--hidden", type=int, help=f"LSTM hidden size {d('hidden')}")
    p.add_argument("--layers", type=int, help="stacked LSTM layers (default: 1); FPTT's fused "
                                              "segment runs one launch per layer")
    p.add_argument("--batch", type=int, help=f"sequences per batch {d('batch')}")
    p.add_argument("--steps", type=int, help=f"sequence batches to train, in total when resuming {d('steps')}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate {d('lr')}")
    p.add_argument("--alpha", type=float, help=f"FPTT alpha (proximal weight, dual step), 0: no "
                                               f"regulariser {d('alpha')}")
    p.add_argument("--regularizer", choices=("decoupled", "coupled"),
                   help="decoupled: the regulariser's step outside the clip and Adam's "
                        "normalisation; coupled: the paper's, added to the gradient Adam sees, "
                        "which stalls the Add task (docs/ALGORITHM.md) (default: decoupled)")
    p.add_argument("--beta", type=float, help=f"FPTT beta (running-average step) {d('beta')}")
    p.add_argument("--rho", type=float, help=f"FPTT rho (0: authors' code, 0.5: paper's Alg. 1) {d('rho')}")
    p.add_argument("--clip", type=float, help=f"global gradient-norm clip, 0: none {d('clip')}")
    if algo:
        p.add_argument("--algo", choices=train.ALGOS, help="(default: fptt)")
    p.add_argument("--protocol", choices=train.PROTOCOLS, help="FPTT's loop: segments (K segments of ceil(T/K) steps, all "
                                      "trained, weights (p+1)/K) or authors (the authors' Add loop: "
                                      "T//K steps, K-1 trained, weights p+1/K, no regulariser unless "
                                      "--alpha is given) (default: segments)")
    p.add_argument("--weights", choices=train.reference.SEGMENT_WEIGHTS,
                   help="segment p's loss weight: ramp, (p+1)/K; authors, p + 1/K (0.1, 1.1, ..., "
                        "as the authors' Add code weights its segments) (default: ramp)")
    p.add_argument("--lstm", choices=train.LSTMS, help="fused (FPTTLSTM, the backend's one-call segment step) or torch "
                                  "(torch's LSTM under autograd + fptt_fast.FPTT) (default: fused)")
    p.add_argument("--seed", type=int, help=f"seed of the model and the training batches {d('seed')}")
    p.add_argument("--backend", choices=("auto",) + backends.BACKENDS, help="FPTT backend (default: auto)")
    p.add_argument("--device", choices=train.DEVICES, help="(default: auto)")
    p.add_argument("--eval-every", dest="eval_every", type=int,
                   help=f"steps between evaluations {d('eval_every')}")
    p.add_argument("--permute", action="store_const", const=True,
                   help="digits: fixed seeded pixel permutation (default: off)")
    p.add_argument("--data-dir", dest="data_dir",
                   help=f"smnist/psmnist: folder of the four MNIST files (train-images-idx3-ubyte, "
                        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw "
                        f"or .gz), also looked for in DIR/MNIST/raw {_task_default('data_dir')}")
    p.add_argument("--download", action="store_true",
                   help="smnist/psmnist: fetch missing MNIST files into --data-dir through torchvision "
                        "(needs torchvision and a network) (default: off)")
    p.add_argument("--limit-test", dest="limit_test", type=int,
                   help=f"smnist/psmnist: evaluate on the first N test images only, 0: all 10000 "
                        f"{_task_default('limit_test')}")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings. add: H=128, Adam 1e-3, alpha=beta=0.5, clip 1, batch 128, "
                        "T=1000, K=10. smnist/psmnist: H=128, Adam 1e-3, alpha 0.1, beta 0.5, clip 1, "
                        "batch 128, K=10, 23450 batches (50 epochs). Options given override them "
                        "(default: off)")
    kind = "<algo>" if algo else "compare"
    p.add_argument("--out", help=f"output folder (default: runs/<task>-{kind}-T<T>, or -2, -3, ... "
                                 f"if that holds a run" + ("; with --resume: the checkpoint's folder)"
                                                           if algo else ")"))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and the fused kernels (default 1: the per-step "
                        "matrix products are small; a 2nd thread mostly adds synchronisation, and "
                        "on a busy machine spinning OpenMP threads slow it by 10x or more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="FPTT training with fused kernels (fptt_fast).",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    resumed = " With --resume, options left out take the checkpoint's values."
    t = sub.add_parser("train", help="train an LSTM with FPTT (or BPTT) on a task",
                       formatter_class=_HelpFormatter,
                       description="Train an LSTM with FPTT (or BPTT) on a task." + resumed)
    _run_options(t, algo=True)
    t.add_argument("--save", help="checkpoint path (default: OUT/checkpoint.pt; with --resume and "
                                  "no --out: the resumed checkpoint); written atomically at each "
                                  "evaluation, at the end and on Ctrl-C, never over another run's file")
    t.add_argument("--resume", help="continue the run of this checkpoint, bitwise identically "
                                    "(default: none, a fresh run)")
    c = sub.add_parser("compare", help="variants (default: FPTT and BPTT) on the same seeds and "
                                       "data, one figure",
                       formatter_class=_HelpFormatter,
                       description="Variants (default: FPTT and BPTT) on the same seeds, data and "
                                   "budget; one figure (mean and range over seeds), compare.csv and "
                                   "summary.csv.")
    _run_options(c, algo=False)
    c.add_argument("--variant", action="append", metavar="LABEL[:KEY=VALUE,...]",
                   help="a variant: a label, then the options it changes, e.g. off:alpha=0, "
                        "dec:decoupled=1,alpha=0.5, bptt:algo=bptt, authors:protocol=authors; "
                        "repeat for each (default: fptt and bptt:algo=bptt)")
    c.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="seeds, each run by every variant (default: --seed's)")
    c.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process with --threads threads (default 1)")
    c.add_argument("--resume", metavar="DIR",
                   help="finish the compare in DIR (interrupted, or with a larger --steps): its "
                        f"{COMPARE_MANIFEST} gives the task, options, variants and seeds; each run "
                        "continues from its checkpoint, bitwise (default: none)")
    b = sub.add_parser("bench", help="FPTT.step throughput per backend vs the reference",
                       formatter_class=_HelpFormatter,
                       description="FPTT.step throughput per backend vs the reference.")
    b.add_argument("--device", default="auto", choices=train.DEVICES, help="where to time")
    b.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1, as train and compare: see README, \"Threads\")")
    b.add_argument("--budget", type=float, default=0.6, help="seconds per measurement")
    return parser


def _given(args) -> dict:
    keys = ("T", "K", "hidden", "layers", "batch", "steps", "lr", "alpha", "beta", "rho", "clip",
            "algo", "seed", "backend", "device", "eval_every", "permute", "data_dir", "limit_test",
            "protocol", "weights", "lstm")
    given = {k: getattr(args, k, None) for k in keys}
    reg = getattr(args, "regularizer", None)
    given["decoupled"] = None if reg is None else reg == "decoupled"
    return given


def _default_out(cfg, kind: str) -> str:
    task = cfg.task + ("-permuted" if cfg.permute else "")
    return os.path.join("runs", f"{task}-{kind}-T{cfg.T}")


# A compare's own files. compare.json, written before any run starts, says what the
# compare is, so that `compare --resume DIR` can finish it.
COMPARE_MANIFEST = "compare.json"
COMPARE_FILES = ("compare.csv", "compare.png", "summary.csv", COMPARE_MANIFEST)
COMPARE_FORMAT = "fptt_fast.compare/1"
# What --resume DIR lets a compare change: how long and how it runs, not what it trains.
RESUME_MAY_GIVE = ("steps", "jobs", "threads", "no_progress", "data_dir")
# What a variant may change (--variant LABEL:KEY=VALUE,...): how a run learns, not the task.
VARIANT_KEYS = ("algo", "protocol", "weights", "lstm", "alpha", "beta", "rho", "decoupled", "lr", "clip", "K",
                "backend")
DEFAULT_VARIANTS = ("fptt", "bptt:algo=bptt")


def parse_variants(specs) -> dict:
    """{label: {field: value}} from --variant specs (LABEL[:KEY=VALUE,...]), values typed as
    train.Config's fields; UsageError for a bad label, key or value."""
    import dataclasses
    import re

    from .train import Config, UsageError

    types = {f.name: type(f.default) for f in dataclasses.fields(Config)}
    variants = {}
    for spec in specs or DEFAULT_VARIANTS:
        label, _, rest = spec.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
            raise UsageError(f"--variant {spec!r}: the label must be letters, digits, '.', '_' or '-'")
        if label in variants:
            raise UsageError(f"--variant {spec!r}: the label {label!r} is given twice")
        changes = {}
        for item in filter(None, rest.split(",")):
            key, eq, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in VARIANT_KEYS:
                raise UsageError(f"--variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(VARIANT_KEYS)}")
            text = text.strip()
            try:
                if types[key] is bool:
                    if text.lower() not in ("1", "0", "true", "false"):
                        raise ValueError
                    value = text.lower() in ("1", "true")
                else:
                    value = types[key](text)
            except ValueError:
                raise UsageError(f"--variant {spec!r}: {key} must be a {types[key].__name__}, "
                                 f"got {text!r}") from None
            changes[key] = value
        variants[label] = changes
    return variants


def _compare_runs(variants: dict, seeds) -> dict:
    """{(label, seed): folder of the run inside the compare's folder}: the label alone for
    one seed, label/seed<S> for several."""
    return {(label, seed): label if len(seeds) == 1 else os.path.join(label, f"seed{seed}")
            for label in variants for seed in seeds}


def _compare_files(folders):
    """What a compare writes under its folder: its own files and a run in each run folder."""
    from .train import RUN_FILES

    return COMPARE_FILES + tuple(os.path.join(f, n) for f in folders for n in RUN_FILES)


def _unused_folder(base: str, names) -> str:
    """base, or base-2, base-3, ...: the first that holds none of `names`, so that running
    the same command twice does not write over the first run."""
    from .train import run_files_in

    folder, n = base, 1
    while os.path.lexists(folder) and (not os.path.isdir(folder) or run_files_in(folder, names)):
        n += 1
        folder = f"{base}-{n}"
    return folder


def _refuse_other_run(out: str, names, own: str | None = None) -> None:
    """UsageError if folder `out` holds another run's files (those of `names` it has);
    `own` is the resumed checkpoint's folder, whose files are the same run's."""
    from .train import CHECKPOINT, UsageError, run_files_in

    if not os.path.isdir(out) or (own is not None and os.path.samefile(out, own)):
        return
    found = run_files_in(out, names)
    if found:
        hint = (f", or continue that run with --resume {os.path.join(out, CHECKPOINT)}"
                if CHECKPOINT in found else "")
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}), and a run never "
                         f"overwrites another run's files: choose a new folder{hint}")


def _refuse_empty(args, options) -> None:
    """An empty path would quietly mean the current folder (--out) or fail at the first
    save (--save): refuse it."""
    from .train import UsageError

    for option in options:
        if getattr(args, option.lstrip("-"), None) == "":
            raise UsageError(f"{option} needs a path, got an empty one")


def _train_paths(args, cfg) -> tuple:
    """(output folder, checkpoint path, the folders to create) of a train run, checked
    before anything is read or written (prepare_folders creates them once the run is
    built). A resumed run continues in its checkpoint's own folder and file unless
    --out/--save say otherwise: a copy of a checkpoint must not write over the
    original run, wherever that is."""
    from .train import CHECKPOINT, LOG_CSV, LOSS_PNG, RUN_FILES, UsageError, check_folder, check_new_file

    own = (os.path.dirname(args.resume) or ".") if args.resume is not None else None
    if args.out is not None:
        out = args.out
    elif own is not None:
        out = own
    else:
        out = _unused_folder(_default_out(cfg, cfg.algo), RUN_FILES)
    if args.save is not None:
        save = args.save
    elif args.resume is not None and args.out is None:
        save = args.resume
    else:
        save = os.path.join(out, CHECKPOINT)
    check_folder(out, "--out")
    _refuse_other_run(out, RUN_FILES, own)
    if os.path.abspath(save) in {os.path.abspath(os.path.join(out, n)) for n in (LOG_CSV, LOSS_PNG)}:
        raise UsageError(f"--save {save} is this run's own {os.path.basename(save)}")
    check_new_file(save, "--save", may_replace=args.resume)
    return out, save, [(out, "--out"), (os.path.dirname(save) or ".", "--save")]


def _compare_out(args, cfg, folders) -> tuple:
    """The compare's folder and the folders to create (it, with a folder per run), checked
    before anything is read or written."""
    from .train import check_folder

    names = _compare_files(folders)
    out = args.out if args.out is not None else _unused_folder(_default_out(cfg, "compare"), names)
    check_folder(out, "--out")
    _refuse_other_run(out, names)
    return out, [(os.path.join(out, f), "--out") for f in folders]


def _check_download(args) -> None:
    from .train import MNIST_TASKS, UsageError

    if args.download and args.task not in MNIST_TASKS:
        raise UsageError(f"--download applies to the MNIST tasks ({', '.join(MNIST_TASKS)}) only")


def _backend_line(run) -> str:
    cfg = run.cfg
    if cfg.algo == "bptt":
        return f"algo: bptt ({run.backend}, clip {cfg.clip:g}); device {run.device}"
    avail = [b for b, why in backends.available(run.device.type).items() if why is None]
    return (f"backend: {run.backend} (requested {cfg.backend}; available on {run.device.type}: "
            f"{', '.join(avail)}); device {run.device}")


def _final_line(run, label=None) -> str:
    step, loss, test = run.final()
    loss_s = "n/a" if loss is None else f"{loss:.5g}"
    return (f"final [{label or run.cfg.algo}]: step {step}  train_loss {loss_s}  {run.task.metric} {test:.5g}  "
            f"({run.elapsed:.1f} s)")


def _start_distributed(cfg):
    """The torchrun process group (fptt_fast.distributed.init_from_env) for this run's
    device, or None for one process."""
    from . import distributed
    from .train import UsageError, resolve_device

    try:
        d = distributed.init_from_env(resolve_device(cfg.device).type)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if d is not None and d.owned:
        _GROUP_STARTED.append(True)  # main() leaves through _exit_after_group
    return d


# Non-empty once this process started a torchrun process group (_start_distributed).
_GROUP_STARTED = []


def _exit_after_group(code: int) -> None:
    """The end of a process that ran a torchrun process group (destroyed by now, every
    file written and closed): flush and leave without interpreter shutdown.

    Why: gloo runs each collective on a worker thread that drops the collective's tensors
    a moment after the caller sees it complete, and dropping a tensor with a Python object
    takes the GIL. A rank that stops right after a collective (the refusal after
    distributed.agree) can reach interpreter shutdown first; the worker is then ended
    inside that destructor and the process dies in std::terminate (SIGABRT: exit -6, not
    2; about 1 run in 8 on a 2-core machine; cf. pytorch/pytorch#179291)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing left to say there
            pass
    os._exit(code)


def _distributed_line(run) -> str:
    from . import distributed

    d, batch = run.dist, run.cfg.batch
    sizes = sorted({hi - lo for lo, hi in (distributed.shard_rows(batch, r, d.world) for r in range(d.world))})
    return (f"torchrun: {d.world} processes ({d.backend}); each batch of {batch} rows split into "
            f"{' or '.join(map(str, sizes[::-1]))} rows per process; rank 0 writes the files")


def _on_rank0(dist, fn) -> None:
    """fn() on rank 0 only (all of it with one process); under torchrun the other ranks
    learn whether it failed (one all_reduce), so that every rank stops with exit code 2
    rather than waiting for rank 0 in the next collective."""
    from . import distributed
    from .train import UsageError

    if dist is None:
        fn()
        return
    error = None
    if dist.is_main:
        try:
            fn()
        except UsageError as e:
            error = e
    if distributed.any_rank(error is not None, dist.pg):
        raise error or UsageError("rank 0 could not prepare the run's folders (its message is on its output)")


def _download_once(args, cfg, dist) -> bool:
    """Under torchrun rank 0 alone fetches MNIST (--download), before any rank reads it;
    then no rank downloads. Returns the download flag for Run."""
    from . import distributed, mnist
    from .train import MNIST_TASKS, UsageError

    if dist is None or not args.download or cfg.task not in MNIST_TASKS:
        return args.download
    failed = None
    if dist.is_main:
        try:
            mnist.load(cfg.data_dir, download_missing=True)
        except mnist.MNISTError as e:
            failed = str(e)
    if distributed.any_rank(failed is not None, dist.pg):
        raise UsageError(failed or "--download failed on rank 0 (its message is on its output)")
    return False


def _train_resume_command(cfg, save: str) -> str:
    """The command that continues a train run from its checkpoint `save` (its log and
    plot then go next to the checkpoint: the checkpoint holds the whole history)."""
    import shlex

    return f"{PROG} train {cfg.task} --algo {cfg.algo} --resume {shlex.quote(save)}"


def cmd_train(args) -> int:
    from . import distributed
    from .train import (LOG_CSV, LOSS_PNG, Interrupted, Run, UsageError, load_checkpoint, make_config,
                        prepare_folders)

    _refuse_empty(args, ("--out", "--save", "--resume", "--data-dir"))
    _check_download(args)
    ckpt = None
    if args.resume is not None:
        if args.paper:
            raise UsageError("--paper cannot be combined with --resume (the checkpoint fixes the settings)")
        ckpt = load_checkpoint(args.resume)  # under torchrun: every rank reads the same file
    cfg = make_config(args.task, _given(args), paper=args.paper, checkpoint=ckpt)
    out, save, folders = _train_paths(args, cfg)  # checked before a download or data read
    dist = _start_distributed(cfg)
    try:
        run = Run(cfg, ckpt, download=_download_once(args, cfg, dist), dist=dist)
        say = print if run.is_main else (lambda *a, **k: None)
        _on_rank0(dist, lambda: prepare_folders(folders))
        say(cfg.describe() + (f"  (resumed at step {run.step})" if ckpt else ""))
        say(_backend_line(run))
        if dist is not None:
            say(_distributed_line(run))
        try:
            run.fit(out, save_path=save, progress=not args.no_progress)
        except Interrupted as e:
            e.resume = _train_resume_command(cfg, save)
            raise
        say(_final_line(run))
        say(f"wrote {os.path.join(out, LOG_CSV)}, {os.path.join(out, LOSS_PNG)}, {save}")
    finally:
        distributed.shutdown(dist)
    return 0


def _set_threads(threads) -> None:
    """torch's CPU threads, and denormal floats flushed to zero: on x86 each operation on a
    denormal costs 10-100x a normal one, and long sequences fill backward passes with them
    (gradients vanishing through hundreds of steps: BPTT at T=500 ran 6x slower)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


# A compare worker's stop flags (--jobs): the parent's, set once SIGINT stopped the
# compare, and the worker's own, set when a SIGINT reached one of its runs.
_STOP = None
_INTERRUPTED = False


def _compare_worker_init(stop) -> None:
    """A --jobs worker: a SIGINT between runs (or while one is being built) is remembered,
    not raised, and no run starts after it; during fit the run's own handler takes it
    (the run saves at its step boundary). `stop`: the parent's flag, likewise."""
    import signal

    def remember(signum, frame):
        global _INTERRUPTED
        _INTERRUPTED = True

    global _STOP
    signal.signal(signal.SIGINT, remember)
    _STOP = stop


def _stopped() -> bool:
    return _INTERRUPTED or (_STOP is not None and _STOP.is_set())


def _compare_job(cfg_fields: dict, out_dir: str, threads, download: bool, label: str,
                 checkpoint: str | None) -> tuple:
    """One run of a compare in a worker process (--jobs): (history, backend line, final
    line), or None if SIGINT stopped it (its checkpoint saved at the step boundary) or
    the compare was stopped before it started."""
    from .train import Config, Interrupted, Run, load_checkpoint

    global _INTERRUPTED
    if _stopped():
        return None
    _set_threads(threads)
    run = Run(Config(**cfg_fields), load_checkpoint(checkpoint) if checkpoint else None,
              download=download)
    if _stopped():
        return None
    try:
        run.fit(out_dir, progress=False)
    except Interrupted:
        _INTERRUPTED = True  # this worker saw the SIGINT: it starts no other run
        return None
    _INTERRUPTED = run.interrupted_at_end
    return run.history, _backend_line(run), _final_line(run, label)


def _write_manifest(out: str, task: str, paper: bool, given: dict, variants: dict, seeds) -> None:
    import json

    from .train import atomic_write

    text = json.dumps({"format": COMPARE_FORMAT, "task": task, "paper": paper,
                       "given": {k: v for k, v in given.items() if v is not None},
                       "variants": variants, "seeds": list(seeds)}, indent=1)
    atomic_write(os.path.join(out, COMPARE_MANIFEST), lambda f: f.write(text.encode()))


def _read_manifest(folder: str) -> dict:
    """The compare in `folder` (its compare.json), checked; UsageError if it is none."""
    import json

    from .train import UsageError

    path = os.path.join(folder, COMPARE_MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--resume {folder}: no {COMPARE_MANIFEST} there (not a compare's "
                         f"folder, or one written before compare --resume existed)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {folder}: cannot read {path}: {e}") from None
    ok = (isinstance(m, dict) and m.get("format") == COMPARE_FORMAT and isinstance(m.get("task"), str)
          and isinstance(m.get("given"), dict) and isinstance(m.get("variants"), dict)
          and all(isinstance(v, dict) for v in m["variants"].values())
          and isinstance(m.get("seeds"), list) and all(isinstance(x, int) for x in m["seeds"]))
    if not ok:
        raise UsageError(f"--resume {folder}: {path} is not a {COMPARE_FORMAT} manifest (damaged?)")
    return m


def _compare_plan(args) -> tuple:
    """(task, given options, paper, variants, seeds, output folder or None) of this compare:
    from the command line, or with --resume DIR from DIR's manifest (the command line may
    then change only RESUME_MAY_GIVE)."""
    from .train import UsageError, make_config

    if args.resume is None:
        if args.task is None:
            raise UsageError("compare needs a task (add, digits, smnist or psmnist), or --resume DIR")
        variants, given = parse_variants(args.variant), _given(args)
        seeds = (list(dict.fromkeys(args.seeds)) if args.seeds
                 else [make_config(args.task, given, paper=args.paper).seed])
        return args.task, given, args.paper, variants, seeds, args.out
    m = _read_manifest(args.resume)
    if args.task is not None and args.task != m["task"]:
        raise UsageError(f"--resume {args.resume} is a compare of {m['task']}, not {args.task}")
    given = _given(args)
    extra = [k for k, v in given.items() if v is not None and k not in RESUME_MAY_GIVE]
    extra += [o for o, v in (("variant", args.variant), ("seeds", args.seeds), ("out", args.out),
                             ("paper", args.paper), ("download", args.download)) if v]
    if extra:
        options = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise UsageError(f"--resume takes the compare's settings from {COMPARE_MANIFEST}: leave out "
                         f"{options} (only --steps, --jobs, --threads, --no-progress, --data-dir may change)")
    given = {**m["given"], **{k: getattr(args, k) for k in ("steps", "data_dir")
                              if getattr(args, k) is not None}}
    return m["task"], given, m["paper"], m["variants"], m["seeds"], args.resume


def cmd_compare(args) -> int:
    import shlex

    from . import distributed
    from .train import (CHECKPOINT, Interrupted, Run, UsageError, load_checkpoint, make_config,
                        plot_variants, prepare_folders, task_metric, write_compare_csv,
                        write_summary_csv)

    _refuse_empty(args, ("--out", "--data-dir", "--resume"))
    if args.task is not None:
        _check_download(args)
    if args.jobs < 1:
        raise UsageError(f"jobs must be positive, got {args.jobs}")
    task, given, paper, variants, seeds, out = _compare_plan(args)
    resuming = args.resume is not None
    folders = _compare_runs(variants, seeds)

    def run_options(label, seed):
        opts = {**given, **variants[label], "seed": seed}
        if opts.get("algo") == "bptt":  # FPTT's loop options: the BPTT arm keeps its own
            for key in ("protocol", "weights"):
                if key not in variants[label]:
                    opts[key] = None
        return opts

    # resuming: each run from its checkpoint, if it saved one; a complete run is not rebuilt
    ckpt_paths, ckpts = {}, {}
    if resuming:
        for key, folder in folders.items():
            path = os.path.join(out, folder, CHECKPOINT)
            if os.path.exists(path):
                ckpt_paths[key], ckpts[key] = path, load_checkpoint(path)
    cfgs = {key: make_config(task, run_options(*key), paper=paper, checkpoint=ckpts.get(key))
            for key in folders}
    done = {key for key, c in ckpts.items() if c["step"] >= cfgs[key].steps}
    for key in done:
        if ckpts[key]["step"] > cfgs[key].steps:
            raise UsageError(f"--steps {cfgs[key].steps}: the run in {folders[key]} is already at "
                             f"step {ckpts[key]['step']}")
    cfg = next(iter(cfgs.values()))
    label = (lambda key: key[0]) if len(seeds) == 1 else (lambda key: f"{key[0]} seed {key[1]}")
    if resuming:
        made = [(os.path.join(out, f), "--resume") for f in folders.values()]
    else:
        out, made = _compare_out(args, cfg, list(folders.values()))  # checked before a download
    resume_command = f"{PROG} compare --resume {shlex.quote(out)}"
    metric = task_metric(task)
    dist = _start_distributed(cfg)
    try:
        if dist is not None and args.jobs > 1:
            raise UsageError("--jobs runs one process per run: not under torchrun")
        download = _download_once(args, cfg, dist)
        todo = [key for key in folders if key not in done]
        # build (and validate) every run to train before writing anything
        runs = {key: Run(cfgs[key], ckpts.get(key), download=download, dist=dist) for key in todo}
        main = dist is None or dist.is_main
        say = print if main else (lambda *a, **k: None)
        _on_rank0(dist, lambda: prepare_folders(made))
        if main:
            _write_manifest(out, task, paper, given, variants, seeds)
        say(f"compare {', '.join(variants)} on seeds {', '.join(map(str, seeds))}: "
            f"{len(folders)} runs of {cfg.steps} batches" +
            (f" ({len(done)} complete, {len(ckpts) - len(done)} resumed)" if resuming else ""))
        if dist is not None and runs:
            say(_distributed_line(next(iter(runs.values()))))
        results = {key: (ckpts[key]["history"], _history_line(ckpts[key], label(key), metric))
                   for key in done}
        if args.jobs == 1:
            for key, run in runs.items():
                say(f"[{label(key)}] {run.cfg.describe()}; {_backend_line(run)}")
                try:
                    run.fit(os.path.join(out, folders[key]), progress=not args.no_progress)
                except Interrupted as e:
                    e.resume = resume_command
                    raise
                results[key] = (run.history, _final_line(run, label(key)))
                if run.interrupted_at_end and len(results) < len(folders):
                    e = Interrupted(None, out)  # SIGINT in the run's last step: stop here
                    e.resume = resume_command
                    raise e
        else:
            runs.clear()  # each worker builds its own
            results.update(_compare_in_workers(args, cfgs, todo, folders, out, ckpt_paths, download,
                                               label, say, resume_command))
        if main:
            name = lambda key: label(key).replace(" seed ", "-seed")  # noqa: E731
            histories = {key: [tuple(r) for r in results[key][0]] for key in folders}
            write_compare_csv(os.path.join(out, "compare.csv"),
                              {name(k): h for k, h in histories.items()}, metric)
            write_summary_csv(os.path.join(out, "summary.csv"), histories, metric)
            plot_variants(os.path.join(out, "compare.png"),
                          {label: [histories[(label, s)] for s in seeds] for label in variants},
                          metric, f"{cfg.task} T={cfg.T} K={cfg.K} H={cfg.hidden} batch={cfg.batch} "
                                  f"lr={cfg.lr:g} {cfg.steps} batches, seeds {', '.join(map(str, seeds))}")
        for key in folders:
            say(results[key][1])
        say(f"wrote {os.path.join(out, 'compare.csv')}, {os.path.join(out, 'summary.csv')}, "
            f"{os.path.join(out, 'compare.png')}")
    finally:
        distributed.shutdown(dist)
    return 0


def _compare_in_workers(args, cfgs, todo, folders, out, ckpt_paths, download, label, say,
                        resume_command) -> dict:
    """The runs `todo` in --jobs worker processes; {key: (history, final line)}. SIGINT
    (Ctrl-C reaches the workers too): the runs under way save at their step boundary, the
    ones not started do not start (cancelled, or stopped by the shared flag), then
    Interrupted (with the command that finishes the compare)."""
    import concurrent.futures
    import dataclasses
    import multiprocessing

    from concurrent.futures.process import BrokenProcessPool

    from .train import Interrupted, _sigint_at_step_boundary

    results, stopped = {}, False
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    with _sigint_at_step_boundary() as interrupted, \
            concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_compare_worker_init,
                                                   initargs=(stop,)) as pool:
        futures = {pool.submit(_compare_job, dataclasses.asdict(cfgs[key]),
                               os.path.join(out, folders[key]), args.threads, download, label(key),
                               ckpt_paths.get(key)): key for key in todo}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.2)
            for f in finished:
                key = futures[f]
                try:
                    result = f.result()
                except (concurrent.futures.CancelledError, KeyboardInterrupt, BrokenProcessPool):
                    if not (stopped or interrupted()):  # not ours: a worker died
                        raise
                    result = None
                if result is None:
                    stopped = True
                    continue
                history, backend_line, final_line = result
                say(f"[{label(key)}] {cfgs[key].describe()}; {backend_line}")
                say(f"  {final_line}", flush=True)
                results[key] = (history, final_line)
            if interrupted() or stopped:
                stopped = True
                stop.set()  # the runs queued in the workers return at once
                for f in pending:
                    f.cancel()
    if stopped:
        e = Interrupted(None, out)
        e.resume = resume_command
        raise e
    return results


def _history_line(ckpt: dict, label: str, metric: str) -> str:
    """_final_line of a complete run from its checkpoint."""
    step, loss, test = [r for r in ckpt["history"] if r[2] is not None][-1][:3]
    return (f"final [{label}]: step {step}  train_loss {loss:.5g}  {metric} {test:.5g}  "
            f"({float(ckpt['elapsed']):.1f} s, earlier)")


def cmd_bench(args) -> int:
    from . import bench
    from .train import UsageError

    if not args.budget > 0:
        raise UsageError(f"budget must be positive, got {args.budget}")
    bench.main(args.device, args.budget)
    return 0


def _rank_prefix() -> str:
    """'[rank r] ' on the stderr lines of ranks other than 0 under torchrun."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and rank != "0" else ""


def main(argv=None) -> int:
    """The command line; returns the exit code. A process that started a torchrun process
    group does not return: it leaves through _exit_after_group (an exception nobody
    caught prints its traceback and exits 1, as Python would)."""
    try:
        code = _main(argv)
    except BaseException as e:
        if not _GROUP_STARTED:
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            import traceback

            traceback.print_exc()
            code = 1
    if _GROUP_STARTED:
        _exit_after_group(code)
    return code


def _main(argv=None) -> int:
    from .train import Interrupted, UsageError, WriteError

    args = build_parser().parse_args(argv)
    prog = _rank_prefix() + PROG
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"threads must be positive, got {args.threads}")
        _set_threads(args.threads)
        return {"train": cmd_train, "compare": cmd_compare, "bench": cmd_bench}[args.command](args)
    except UsageError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk, say: the files written before are whole
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGINT, handled by the run: a checkpoint of this very step
        if prog != PROG:  # under torchrun rank 0 saved it and says so
            return 130
        saved = (f" at step {e.step}; saved {e.save_path}" if e.step is not None else
                 f"; the runs under way saved checkpoints in {e.save_path}")
        print(f"{prog}: interrupted{saved} (continue with: {e.resume})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training, or a second Ctrl-C
        print(f"{prog}: interrupted (a training run's checkpoint is the one of its last evaluation)",
              file=sys.stderr)
        return 130
