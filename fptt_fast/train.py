"""Training runs for the command line: tasks, the model+optimiser pair, the loop,
evaluation, CSV log, loss plot and checkpoints.

Everything random comes from seeds: the model from `seed`, the training batches from
a torch.Generator seeded with `seed` (its state is checkpointed), the evaluation data
from fixed seeds of their own. So a run resumed from a checkpoint draws exactly the
batches the uninterrupted run would have drawn, and continues bitwise identically.

Bad input (unknown names, impossible shapes, unreadable or mismatching checkpoints)
raises UsageError before any file is written; the CLI turns it into one line on
stderr and exit code 2.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from . import backends, reference, tasks
from .optim import FPTT
from .lstm import FPTTLSTM

TASKS = ("add", "digits")
ALGOS = ("fptt", "bptt")
DEVICES = ("auto", "cpu", "cuda")
CKPT_FORMAT = "fptt_fast.train/1"
SEED_LIMIT = 2**62
# The training batches come from Generator(seed + DATA_SEED_OFFSET) (not from `seed`
# itself, which initialises the model: the first batch should not mirror the weights).
DATA_SEED_OFFSET = 2**62
# The Add test set: a fixed seed outside every training stream's range (>= 2**63).
ADD_EVAL_SEED = 2**63 + 271828
ADD_EVAL_SIZE = 1000
EVAL_CHUNK = 100          # time steps per forward chunk in evaluation (bounded memory)


class UsageError(ValueError):
    """Bad input from the user; the message is one line."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or does not fit the requested run."""


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclass
class Config:
    """One run. The fields above `steps` define what is trained (a resumed run must
    agree with its checkpoint on them); the rest may change between sessions."""

    task: str = "add"
    algo: str = "fptt"
    T: int = 30
    K: int = 5
    hidden: int = 32
    batch: int = 256
    lr: float = 2e-2
    alpha: float = 0.5
    beta: float = 0.5
    rho: float = 0.0
    clip: float = 1.0
    seed: int = 0
    permute: bool = False
    steps: int = 1500
    eval_every: int = 100
    backend: str = "auto"
    device: str = "auto"

    def describe(self) -> str:
        perm = " permuted" if self.permute else ""
        return (f"{self.task}{perm} {self.algo} T={self.T} K={self.K} H={self.hidden} "
                f"batch={self.batch} lr={self.lr:g} seed={self.seed}")


RUN_FIELDS = ("task", "algo", "T", "K", "hidden", "batch", "lr", "alpha", "beta", "rho",
              "clip", "seed", "permute")
# Quick defaults: about a minute on 2 CPU cores with --threads 1 (add: test MSE ~0.005).
DEFAULTS = {
    "add": dict(T=30, K=5, hidden=32, batch=256, lr=2e-2, steps=1500, eval_every=100),
    "digits": dict(T=64, K=8, hidden=64, batch=64, lr=1e-2, steps=800, eval_every=50),
}
# Kag & Saligrama's Add-task settings (FPTT.md); the step count is ours.
PAPER = {"add": dict(T=1000, K=10, hidden=128, batch=128, lr=1e-3, alpha=0.5, beta=0.5, clip=1.0,
                     steps=5000, eval_every=100)}


def make_config(task: str, given: dict, paper: bool = False, checkpoint: dict | None = None) -> Config:
    """The run's Config: task defaults (or --paper's, or the checkpoint's) overridden by
    the options the user gave (`given`, None = not given). A checkpoint fixes RUN_FIELDS:
    giving one of them with another value is an error, not a silent change."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if checkpoint is not None:
        saved = checkpoint["config"]
        if saved["task"] != task:
            raise CheckpointError(f"the checkpoint holds a {saved['task']!r} run, not {task!r}")
        for k, v in given.items():
            if k in RUN_FIELDS and v != saved[k]:
                raise CheckpointError(f"the checkpoint was trained with {k}={saved[k]!r}; "
                                      f"{k}={v!r} was given (leave it out to resume)")
        values = {**saved, **given}
    else:
        if paper and task not in PAPER:
            raise UsageError(f"--paper has settings for: {', '.join(PAPER)}")
        values = {"task": task, **DEFAULTS[task], **(PAPER[task] if paper else {}), **given}
    cfg = Config(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(Config)}})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise UsageError for the first impossible setting."""
    if cfg.algo not in ALGOS:
        raise UsageError(f"unknown algorithm {cfg.algo!r}; choose one of: {', '.join(ALGOS)}")
    for name in ("T", "K", "hidden", "batch", "steps", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.task == "digits" and cfg.T != 64:
        raise UsageError(f"the digits task has T=64 (one 8x8 image per sequence), got T={cfg.T}")
    if cfg.task == "add" and cfg.T < 2:
        raise UsageError(f"the Add task needs T >= 2, got T={cfg.T}")
    if cfg.permute and cfg.task != "digits":
        raise UsageError("--permute applies to the digits task only")
    try:
        reference.segment_bounds(cfg.T, cfg.K)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ("lr", "alpha", "beta", "rho", "clip"):
        if not math.isfinite(getattr(cfg, name)):
            raise UsageError(f"{name} must be finite, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise UsageError(f"seed must be in [0, 2**62), got {cfg.seed}")
    if cfg.device not in DEVICES:
        raise UsageError(f"unknown device {cfg.device!r}; choose one of: {', '.join(DEVICES)}")
    if cfg.backend not in backends.BACKENDS + ("auto",):
        raise UsageError(f"unknown backend {cfg.backend!r}; choose one of: "
                         f"{', '.join(backends.BACKENDS + ('auto',))}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete FPTT backend, or UsageError listing what is available and why not."""
    try:
        return backends.resolve(name, device.type)
    except RuntimeError as e:
        avail = backends.available(device.type)
        ok = ", ".join(b for b, why in avail.items() if why is None)
        why_not = "; ".join(f"{b}: {why}" for b, why in avail.items() if why is not None)
        raise UsageError(f"{e}. Available for {device.type}: {ok}. Not available: {why_not}") from None


# ----------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------


def _final_hidden(model, x):
    """The LSTM's last hidden state, run in chunks of time so memory stays bounded."""
    run = model.lstm if hasattr(model, "lstm") else model  # LSTMWithHead or FPTTLSTM
    state = None
    for a in range(0, x.shape[0], EVAL_CHUNK):
        _, state = run(x[a:a + EVAL_CHUNK], state)
    return state[0]


class AddTask:
    """Regression of the sum of the two marked values (FPTT.md); metric: test MSE."""

    input_size, output_size, loss, metric = 2, 1, "mse", "test_mse"

    def __init__(self, cfg: Config, device):
        self.T = cfg.T
        gen = torch.Generator().manual_seed(ADD_EVAL_SEED)
        self.x_test, self.y_test = tasks.add_task(cfg.T, ADD_EVAL_SIZE, gen, device=device)

    def batch(self, size, gen, device):
        return tasks.add_task(self.T, size, gen, device=device)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        pred = model.head(_final_hidden(model, self.x_test))
        return torch.nn.functional.mse_loss(pred, self.y_test).item()


class DigitsTask:
    """Sequential (optionally permuted) 8x8 digits; metric: test accuracy."""

    input_size, output_size, loss, metric = 1, 10, "ce", "test_accuracy"

    def __init__(self, cfg: Config, device):
        from .data import Digits

        self.data = Digits(permute=cfg.permute)
        if cfg.batch > self.data.n_train:
            raise UsageError(f"batch={cfg.batch} exceeds the {self.data.n_train} training digits")
        self.x_test, self.y_test = self.data.x_test.to(device), self.data.y_test.to(device)

    def batch(self, size, gen, device):
        x, y = self.data.batch(size, gen)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        pred = model.head(_final_hidden(model, self.x_test)).argmax(dim=1)
        return (pred == self.y_test).float().mean().item()


def make_task(cfg: Config, device):
    return {"add": AddTask, "digits": DigitsTask}[cfg.task](cfg, device)


# ----------------------------------------------------------------------------
# The model and its optimiser
# ----------------------------------------------------------------------------


class Trainer:
    """A model, its optimiser, and how one batch of sequences trains them.

    train_batch returns the loss of the prediction from the whole sequence: for FPTT
    the last segment's (unweighted) loss, for BPTT the sequence loss."""

    def __init__(self, model, opt, cfg: Config, loss: str, backend: str):
        self.model, self.opt, self.cfg, self.loss, self.backend = model, opt, cfg, loss, backend

    def train_batch(self, x, y) -> torch.Tensor:
        if isinstance(self.model, FPTTLSTM):  # the fused segment step
            return self.model.train_sequence(x, y, self.cfg.K)[-1]
        if self.cfg.algo == "fptt":
            return reference.train_sequence_fptt(self.model, self.opt, x, y, self.cfg.K, loss=self.loss)[-1]
        return reference.train_sequence_bptt(self.model, self.opt, x, y, loss=self.loss, clip=self.cfg.clip)


def make_trainer(cfg: Config, task, device: torch.device) -> Trainer:
    """The one place that creates the model+optimiser pair (seeded with cfg.seed).

    FPTT on a fused backend (cpu, triton, cuda): fptt_fast.FPTTLSTM, whose
    train_segment is one fused step (one kernel launch on a GPU). FPTT on the
    reference backend: reference.LSTMWithHead + fptt_fast.FPTT. BPTT: the same model
    + torch.optim.Adam with global-norm clipping."""
    backend = resolve_backend(cfg.backend, device)
    torch.manual_seed(cfg.seed)
    try:
        if cfg.algo == "fptt" and backend != "reference":
            model = FPTTLSTM(task.input_size, cfg.hidden, task.output_size, loss=task.loss,
                             lr=cfg.lr, alpha=cfg.alpha, beta=cfg.beta, rho=cfg.rho, clip=cfg.clip,
                             backend=backend, device=device)
            return Trainer(model, model.optimizer, cfg, task.loss, f"{backend} (FPTTLSTM)")
        model = reference.LSTMWithHead(task.input_size, cfg.hidden, task.output_size, device=device)
        if cfg.algo == "fptt":
            opt = FPTT(model.parameters(), lr=cfg.lr, alpha=cfg.alpha, beta=cfg.beta, rho=cfg.rho,
                       clip=cfg.clip, backend=backend)
        else:
            if cfg.lr < 0 or cfg.clip < 0:
                raise ValueError(f"lr and clip must be >= 0, got lr={cfg.lr}, clip={cfg.clip}")
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            backend = "torch.optim.Adam"
    except ValueError as e:  # bad hyper-parameters, as FPTT/Adam validate them
        raise UsageError(str(e)) from None
    return Trainer(model, opt, cfg, task.loss, backend)


# ----------------------------------------------------------------------------
# Files: atomic writes, checkpoints, CSV, plot
# ----------------------------------------------------------------------------


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file next to `path`, then os.replace it over `path`:
    a failure at any point leaves the previous file untouched (and no temp file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str) -> dict:
    """Read and sanity-check a checkpoint (on the CPU); CheckpointError if unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/truncated files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not an fptt_fast training checkpoint ({CKPT_FORMAT})")
    missing = [k for k in ("config", "step", "model", "optimizer", "data_rng", "torch_rng",
                           "python_rng", "history", "elapsed") if k not in ckpt]
    if missing or not set(RUN_FIELDS) <= set(ckpt["config"]):
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing or 'config fields'})")
    return ckpt


def write_csv(path: str, history: list, metric: str) -> None:
    def write(f):
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["step", "train_loss", metric, "elapsed_s"])
        for step, loss, test, elapsed in history:
            w.writerow([step, repr(loss), "" if test is None else repr(test), f"{elapsed:.3f}"])
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def write_compare_csv(path: str, histories: dict, metric: str) -> None:
    """One row per step: each run's train loss and test metric side by side."""
    names = list(histories)
    by_step = {}
    for i, name in enumerate(names):
        for step, loss, test, _ in histories[name]:
            by_step.setdefault(step, [None] * 2 * len(names))[2 * i:2 * i + 2] = [loss, test]

    def write(f):
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["step"] + [f"{n}_{col}" for n in names for col in ("train_loss", metric)])
        for step in sorted(by_step):
            w.writerow([step] + ["" if v is None else repr(v) for v in by_step[step]])
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def plot_curves(path: str, curves: dict, metric: str, title: str) -> None:
    """curves: {label: history}. Train loss and the test metric against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in curves.items():
        ax_loss.plot([r[0] for r in history], [r[1] for r in history], label=label, alpha=0.8)
        tested = [r for r in history if r[2] is not None]
        ax_test.plot([r[0] for r in tested], [r[2] for r in tested], "o-", label=label, ms=3)
    ax_loss.set(xlabel="step (sequence batch)", ylabel="train loss", title="train loss")
    ax_test.set(xlabel="step (sequence batch)", ylabel=metric, title=metric.replace("_", " "))
    if metric == "test_mse":
        for ax in (ax_loss, ax_test):
            ax.set_yscale("log")
            ax.axhline(1 / 6, color="grey", ls="--", lw=1, label="predict 1.0 (0.167)")
    else:
        ax_test.set_ylim(0, 1)
    for ax in (ax_loss, ax_test):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------


class Run:
    """A configured run: built (and, with a checkpoint, restored) without writing files.

    history: rows (step, train_loss, test metric or None, elapsed_s), one per step."""

    def __init__(self, cfg: Config, checkpoint: dict | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.task = make_task(cfg, self.device)
        self.trainer = make_trainer(cfg, self.task, self.device)
        self.gen = torch.Generator().manual_seed(cfg.seed + DATA_SEED_OFFSET)
        self.step, self.elapsed, self.history = 0, 0.0, []
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.cfg.steps < self.step:
            raise UsageError(f"steps={cfg.steps} but the checkpoint is already at step {self.step}")

    @property
    def backend(self) -> str:
        return self.trainer.backend

    # -- checkpoints --
    def state(self) -> dict:
        return {"format": CKPT_FORMAT, "config": dataclasses.asdict(self.cfg), "step": self.step,
                "elapsed": self.elapsed, "history": self.history,
                "model": self.trainer.model.state_dict(), "optimizer": self.trainer.opt.state_dict(),
                "data_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate()}

    def _restore(self, ckpt: dict) -> None:
        try:
            self.trainer.model.load_state_dict(ckpt["model"])
            self.trainer.opt.load_state_dict(ckpt["optimizer"])
            self.gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            random.setstate(ckpt["python_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"checkpoint does not fit this run: {first}") from None
        self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        self.history = [tuple(r) for r in ckpt["history"]]

    # -- the loop --
    def fit(self, out_dir: str, save_path: str | None = None, progress: bool = True) -> list:
        """Train up to cfg.steps, evaluating every eval_every steps and at the end; each
        evaluation rewrites the CSV and the checkpoint; the plot is drawn at the end."""
        from tqdm import tqdm

        cfg, trainer = self.cfg, self.trainer
        csv_path = os.path.join(out_dir, "log.csv")
        save_path = save_path or os.path.join(out_dir, "checkpoint.pt")
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc=f"{cfg.task} {cfg.algo}",
                   disable=not progress, dynamic_ncols=True, smoothing=0.1)
        start = time.perf_counter() - self.elapsed
        test = None
        try:
            while self.step < cfg.steps:
                x, y = self.task.batch(cfg.batch, self.gen, self.device)
                trainer.model.train()
                loss = trainer.train_batch(x, y).item()
                self.step += 1
                test = None
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    trainer.model.eval()
                    test = self.task.evaluate(trainer.model)
                self.elapsed = time.perf_counter() - start
                self.history.append((self.step, loss, test, self.elapsed))
                bar.update(1)
                if test is not None:
                    bar.set_postfix_str(f"loss={loss:.4g} {self.task.metric}={test:.4g}")
                    if self.step < cfg.steps:  # the last step's files are written below
                        write_csv(csv_path, self.history, self.task.metric)
                        save_checkpoint(save_path, self.state())
                elif self.step % 10 == 0:
                    bar.set_postfix_str(f"loss={loss:.4g}")
        finally:
            bar.close()
        write_csv(csv_path, self.history, self.task.metric)
        save_checkpoint(save_path, self.state())
        plot_curves(os.path.join(out_dir, "loss.png"), {cfg.algo: self.history}, self.task.metric,
                    cfg.describe())
        return self.history

    def final(self) -> tuple:
        """(step, train_loss, test metric) of the last evaluated step."""
        tested = [r for r in self.history if r[2] is not None]
        if not tested:
            return self.step, None, self.task.evaluate(self.trainer.model)
        return tested[-1][:3]
