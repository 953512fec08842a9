"""Training runs for the command line (fptt_fast.cli): tasks, the model+optimiser pair,
the loop, evaluation, CSV log, loss plot and checkpoints.

Contracts: everything random comes from seeds, so a resumed run continues bitwise as the
uninterrupted run would; bad input raises UsageError before training starts and before any
file is written; files are written atomically and a SIGINT stops at the next step boundary
with a checkpoint (Interrupted).
Design: docs/KERNELS.md#fptt_fasttrainpy
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import pickle
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from . import backends, distributed, reference, tasks
from .optim import FPTT
from .lstm import FPTTLSTM

TASKS = ("add", "digits", "smnist", "psmnist")
MNIST_TASKS = ("smnist", "psmnist")
ALGOS = ("fptt", "bptt")
# How FPTT walks a sequence: "segments", fptt_fast's schedule (K segments of ceil(T/K)
# steps, all trained, weights (p+1)/K); "authors", the Add loop of the authors' public code
# (train.py add_task_train_online): segments of T // K steps, only the first K-1 trained,
# weights p + 1/K (0.1, 1.1, ..., as their operator precedence gives), head weight
# xavier_normal_, and, unless --alpha is given, no regulariser (their loop adds none).
PROTOCOLS = ("segments", "authors")
# The LSTM that FPTT trains: "fused", FPTTLSTM (the backend's one-call segment step);
# "torch", torch's own LSTM (oneDNN on a CPU, cuDNN on a GPU) under autograd, with
# fptt_fast.FPTT on the backend as its optimiser (the drop-in path). BPTT always runs
# torch's LSTM.
LSTMS = ("fused", "torch")
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
EVAL_BATCH = 1000         # MNIST: test sequences per evaluation batch (bounded memory)
# psmnist's pixel order: one fixed permutation, the same for every run and seed (the
# training seed varies the model, not the task); saved in each checkpoint and restored
# from it, so a resumed run keeps its order even if torch's randperm changed meanwhile.
MNIST_PERM_SEED = 20210718
# The files a run writes into its output folder (the checkpoint may go elsewhere: --save).
LOG_CSV, LOSS_PNG, CHECKPOINT = "log.csv", "loss.png", "checkpoint.pt"
RUN_FILES = (LOG_CSV, LOSS_PNG, CHECKPOINT)


class UsageError(ValueError):
    """Bad input from the user; the message is one line."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or does not fit the requested run."""


class WriteError(Exception):
    """A run's file could not be written (a full disk, a folder gone read-only, ...); the
    previous version of the file, if any, is intact. The message is one line naming the
    path and the cause."""


class Interrupted(KeyboardInterrupt):
    """SIGINT stopped training at a step boundary, after a checkpoint was saved there.
    A KeyboardInterrupt, so that code not expecting it still stops."""

    def __init__(self, step: int, save_path: str):
        super().__init__(f"interrupted at step {step}")
        self.step, self.save_path = step, save_path
        self.resume = f"--resume {save_path}"  # the CLI sets the whole command that continues


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
    layers: int = 1
    batch: int = 256
    lr: float = 2e-2
    alpha: float = 0.5
    beta: float = 0.5
    rho: float = 0.0
    decoupled: bool = True   # the regulariser outside Adam's normalisation (README: learns Add)
    clip: float = 1.0
    seed: int = 0
    permute: bool = False
    protocol: str = "segments"
    weights: str = "ramp"     # the segments' loss weights (reference.SEGMENT_WEIGHTS)
    lstm: str = "fused"
    steps: int = 1500
    eval_every: int = 100
    backend: str = "auto"
    device: str = "auto"
    data_dir: str = "data"    # smnist/psmnist: the folder of the four MNIST files
    limit_test: int = 0       # smnist/psmnist: evaluate on the first N test images; 0: all

    def describe(self) -> str:
        perm = " permuted" if self.permute else ""
        algo, reg = self.algo, ""
        if algo == "fptt":
            algo += " (authors' loop)" if self.protocol == "authors" else ""
            algo += f" weights={self.weights}" if self.weights != "ramp" else ""
            reg = (" alpha=0 (no regulariser)" if self.alpha == 0 else
                   f" alpha={self.alpha:g}" + (" decoupled" if self.decoupled else " coupled"))
        return (f"{self.task}{perm} {algo} T={self.T} K={self.K} H={self.hidden} "
                f"batch={self.batch} lr={self.lr:g} seed={self.seed}{reg}")


RUN_FIELDS = ("task", "algo", "T", "K", "hidden", "layers", "batch", "lr", "alpha", "beta", "rho",
              "decoupled", "clip", "seed", "permute", "protocol", "weights", "lstm")
# Quick defaults: about a minute on 2 CPU cores with --threads 1 (add: test MSE ~0.005).
# MNIST (T=784) cannot be quick on a CPU: its defaults are the paper's but a smaller model
# and batch and fewer steps (README, "Sequential and permuted MNIST").
_MNIST_DEFAULTS = dict(T=784, K=10, hidden=64, batch=64, lr=1e-3, alpha=0.1, beta=0.5, clip=1.0,
                       steps=1000, eval_every=250)
DEFAULTS = {
    "add": dict(T=30, K=5, hidden=32, batch=256, lr=2e-2, steps=1500, eval_every=100),
    "digits": dict(T=64, K=8, hidden=64, batch=64, lr=1e-2, steps=800, eval_every=50),
    "smnist": _MNIST_DEFAULTS,
    "psmnist": _MNIST_DEFAULTS,
}
# Kag & Saligrama's Add-task settings (docs/ALGORITHM.md); 10000 batches as the authors'
# runner.sh (--epochs 10000, one batch each).
# MNIST: the authors' runner.sh runs `train.py --dataset MNIST-10 [--permute]` with their
# argparse defaults: LSTM nhid 128, Adam lr 1e-3, batch 128, clip 1.0, 10 parts, alpha
# 0.1, beta 0.5 (rho 0), 200 epochs with lr/10 at epochs 50, 75, 90. fptt_fast has no lr
# schedule, so --paper trains the 50 epochs before the first decay: 50 x 469 batches of
# 128 (60000 images). K=10 is fptt_fast's schedule (9 segments of 79 steps and one of 73),
# not the authors' 11 (README, "Differences from the authors' public code").
_MNIST_PAPER = dict(T=784, K=10, hidden=128, batch=128, lr=1e-3, alpha=0.1, beta=0.5, clip=1.0,
                    steps=50 * 469, eval_every=469)
PAPER = {"add": dict(T=1000, K=10, hidden=128, batch=128, lr=1e-3, alpha=0.5, beta=0.5, clip=1.0,
                     steps=10000, eval_every=100),
         "smnist": _MNIST_PAPER, "psmnist": _MNIST_PAPER}
# Options that only the MNIST tasks take.
MNIST_OPTIONS = {"data_dir": "--data-dir", "limit_test": "--limit-test"}


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
    if task not in MNIST_TASKS:
        for name, option in MNIST_OPTIONS.items():
            if name in given:
                raise UsageError(f"{option} applies to the MNIST tasks (smnist, psmnist) only")
    if checkpoint is not None:
        saved = checkpoint["config"]
        _check_checkpoint_kind(checkpoint, task, given.get("algo", Config.algo))
        saved = {**ADDED_FIELDS, **saved}
        for k, v in given.items():
            if k in RUN_FIELDS and v != saved[k]:
                option = "--" + k.replace("_", "-")
                raise CheckpointError(f"the checkpoint has {FIELD_WORDS.get(k, k)} {_show(saved[k])}, "
                                      f"this run asks for {_show(v)} (leave {option} out to resume it)")
        values = {**saved, **given}
    else:
        if paper and task not in PAPER:
            raise UsageError(f"--paper has settings for: {', '.join(PAPER)}; not for {task}")
        values = {"task": task, **DEFAULTS[task], **(PAPER[task] if paper else {}), **given}
        if values.get("protocol") == "authors" and "alpha" not in given:
            values["alpha"] = 0.0  # the authors' Add loop adds no regulariser
    cfg = Config(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(Config)}})
    validate(cfg)
    return cfg


# Config fields added after checkpoints were first written, with the value that reproduces
# what such a checkpoint's run did (it resumes as it was trained).
ADDED_FIELDS = {"decoupled": False, "protocol": "segments", "weights": "ramp", "lstm": "fused",
                "layers": 1}

# A checkpoint's settings in the words of the options that set them.
FIELD_WORDS = {"T": "sequence length T", "K": "segment count K", "hidden": "hidden size",
               "batch": "batch size"}


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_checkpoint(checkpoint: dict) -> str:
    """What a (loaded) checkpoint is, e.g. 'add bptt T=12 K=3 H=8 batch=8 lr=0.02 seed=0
    at step 3 of 3'."""
    saved = {**ADDED_FIELDS, **checkpoint["config"]}
    cfg = Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    return f"{cfg.describe()} at step {checkpoint['step']} of {cfg.steps}"


def _check_checkpoint_kind(checkpoint: dict, task: str, algo: str) -> None:
    """The task and algorithm decide what a checkpoint's tensors mean: resuming a BPTT
    (or other-task) checkpoint as this run would train something else, so refuse it,
    saying what it is. `algo` is fptt unless given, as for a fresh run."""
    saved = checkpoint["config"]
    if saved["task"] == task and saved["algo"] == algo:
        return
    hint = f" (give --algo {saved['algo']} to resume it)" if saved["task"] == task else ""
    raise CheckpointError(f"the checkpoint holds the run '{describe_checkpoint(checkpoint)}'; "
                          f"this run asks for {task} {algo}{hint}")


def validate(cfg: Config) -> None:
    """Raise UsageError for the first impossible setting."""
    if cfg.algo not in ALGOS:
        raise UsageError(f"unknown algorithm {cfg.algo!r}; choose one of: {', '.join(ALGOS)}")
    if cfg.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {cfg.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if cfg.weights not in reference.SEGMENT_WEIGHTS:
        raise UsageError(f"unknown segment weights {cfg.weights!r}; choose one of: "
                         f"{', '.join(reference.SEGMENT_WEIGHTS)}")
    if cfg.algo == "bptt" and cfg.weights != "ramp":
        raise UsageError("--weights is FPTT's segment weighting: BPTT trains on the whole sequence's loss")
    if cfg.protocol == "authors" and cfg.weights != "ramp":
        raise UsageError("--protocol authors has its own segment weights (p + 1/K): leave --weights out")
    if cfg.lstm not in LSTMS:
        raise UsageError(f"unknown lstm {cfg.lstm!r}; choose one of: {', '.join(LSTMS)}")
    if cfg.protocol == "authors" and (cfg.task != "add" or cfg.algo != "fptt"):
        raise UsageError("--protocol authors is the authors' Add-task FPTT loop: it needs the add "
                         "task and --algo fptt")
    if cfg.protocol == "authors" and cfg.K < 2:
        raise UsageError(f"--protocol authors trains the first K-1 of K segments: K must be >= 2, got {cfg.K}")
    if cfg.alpha < 0:
        raise UsageError(f"alpha must be >= 0 (0: no regulariser), got {cfg.alpha}")
    for name in ("T", "K", "hidden", "layers", "batch", "steps", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.task == "digits" and cfg.T != 64:
        raise UsageError(f"the digits task has T=64 (one 8x8 image per sequence), got T={cfg.T}")
    if cfg.task == "add" and cfg.T < 2:
        raise UsageError(f"the Add task needs T >= 2, got T={cfg.T}")
    if cfg.task in MNIST_TASKS and cfg.T != 784:
        raise UsageError(f"the {cfg.task} task has T=784 (one 28x28 image, one pixel per step), got T={cfg.T}")
    if cfg.permute and cfg.task != "digits":
        raise UsageError("--permute applies to the digits task only (permuted MNIST is the task psmnist)")
    if cfg.limit_test < 0:
        raise UsageError(f"limit_test must be >= 0 (0: the whole test set), got {cfg.limit_test}")
    if not cfg.data_dir:
        raise UsageError("--data-dir needs a path, got an empty one")
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
    return state[0] if state[0].dim() == 2 else state[0][-1]  # stacked: the top layer's


class AddTask:
    """Regression of the sum of the two marked values (docs/ALGORITHM.md); metric: test MSE."""

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


class MNISTTask:
    """Sequential MNIST (smnist) or permuted (psmnist): 784 steps of one pixel in [0, 1],
    10 classes, cross-entropy on the last state; metric: accuracy on the t10k test set
    (its first cfg.limit_test images if given). The four IDX files are read from
    cfg.data_dir (fptt_fast.mnist), fetched first through torchvision with `download`.

    state(): the pixel permutation (psmnist), saved in checkpoints; load_state()
    restores it, so a resumed run reads the pixels in the order it was trained on."""

    input_size, output_size, loss, metric = 1, 10, "ce", "test_accuracy"

    def __init__(self, cfg: Config, device, download: bool = False):
        from . import mnist

        try:
            self.data = mnist.load(cfg.data_dir, download_missing=download)
        except mnist.MNISTError as e:
            raise UsageError(str(e)) from None
        if cfg.batch > self.data.n_train:
            raise UsageError(f"batch={cfg.batch} exceeds the {self.data.n_train} training images "
                             f"in {self.data.paths['train_images']}")
        self.task = cfg.task
        self.device = device
        self.permutation = mnist.permutation(MNIST_PERM_SEED) if cfg.task == "psmnist" else None
        n_test = self.data.n_test if cfg.limit_test == 0 else min(cfg.limit_test, self.data.n_test)
        self.test_images = self.data.test_images[:n_test].to(device)
        self.test_labels = self.data.test_labels[:n_test].to(device)

    def state(self) -> dict:
        return {} if self.permutation is None else {"permutation": self.permutation.clone()}

    def load_state(self, state: dict) -> None:
        from . import mnist

        if self.task != "psmnist":
            return
        if "permutation" not in state:
            raise CheckpointError("the psmnist checkpoint holds no pixel permutation (damaged?)")
        try:
            self.permutation = mnist.check_permutation(state["permutation"]).clone()
        except mnist.MNISTError as e:
            raise CheckpointError(f"the checkpoint's psmnist permutation is damaged: {e}") from None

    def batch(self, size, gen, device):
        from .mnist import sequences

        idx = torch.randperm(self.data.n_train, generator=gen)[:size]
        x = sequences(self.data.train_images[idx], self.permutation)
        return x.to(device), self.data.train_labels[idx].to(device)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        from .mnist import sequences

        correct = 0
        for a in range(0, len(self.test_labels), EVAL_BATCH):
            x = sequences(self.test_images[a:a + EVAL_BATCH], self.permutation)
            pred = model.head(_final_hidden(model, x)).argmax(dim=1)
            correct += (pred == self.test_labels[a:a + EVAL_BATCH]).sum().item()
        return correct / len(self.test_labels)


def task_metric(task: str) -> str:
    """The test metric a task reports (test_mse, test_accuracy)."""
    return {"add": AddTask, "digits": DigitsTask}.get(task, MNISTTask).metric


def make_task(cfg: Config, device, download: bool = False):
    if cfg.task in MNIST_TASKS:
        return MNISTTask(cfg, device, download)
    return {"add": AddTask, "digits": DigitsTask}[cfg.task](cfg, device)


# ----------------------------------------------------------------------------
# The model and its optimiser
# ----------------------------------------------------------------------------


class Trainer:
    """A model, its optimiser, and how one batch of sequences trains them.

    train_batch returns the loss of the prediction from the whole sequence: for FPTT
    the last segment's (unweighted) loss, for BPTT the sequence loss.

    Under torchrun (`dist`, fptt_fast.distributed.Dist) x, y are this rank's rows and the
    loss returned is the mean over every rank's rows: FPTTLSTM all-reduces inside its
    step (process_group); the reference model's optimiser steps after an all-reduce of
    the gradients (distributed.ReducedStep; BPTT clips the reduced gradient)."""

    def __init__(self, model, opt, cfg: Config, loss: str, backend: str, dist=None):
        self.model, self.opt, self.cfg, self.loss, self.backend = model, opt, cfg, loss, backend
        self.dist = dist
        self._reduced = None
        if dist is not None and not isinstance(model, FPTTLSTM):
            self._reduced = distributed.ReducedStep(
                opt, dist.pg, clip=cfg.clip if cfg.algo == "bptt" else None)

    def train_batch(self, x, y) -> torch.Tensor:
        if self._reduced is not None:
            return self._train_batch_reduced(x, y)
        return self._sequence(self.opt, x, y)

    def _sequence(self, opt, x, y) -> torch.Tensor:
        """One batch of sequences through the FPTT loop (the protocol's) or BPTT."""
        cfg = self.cfg
        if cfg.algo == "bptt":
            return reference.train_sequence_bptt(self.model, opt, x, y, loss=self.loss,
                                                 clip=cfg.clip if opt is self.opt else 0.0)
        if cfg.protocol == "authors":
            return self._authors_sequence(opt, x, y)
        if isinstance(self.model, FPTTLSTM):  # the fused segment step
            return self.model.train_sequence(x, y, cfg.K, weights=cfg.weights)[-1]
        return reference.train_sequence_fptt(self.model, opt, x, y, cfg.K, loss=self.loss,
                                             weights=cfg.weights)[-1]

    def _authors_sequence(self, opt, x, y) -> torch.Tensor:
        """The authors' Add loop (PROTOCOLS): segments of T // K steps, the first K-1
        trained, segment p weighted p + 1/K; returns the last trained segment's loss."""
        K, step = self.cfg.K, x.shape[0] // self.cfg.K
        weights = reference.segment_weights(K, "authors")
        state, loss = None, None
        for p in range(K - 1):
            xs, weight = x[p * step:(p + 1) * step], weights[p]
            if isinstance(self.model, FPTTLSTM):
                loss, state = self.model.train_segment(xs, y, state, weight=weight)
                continue
            seg_loss, state = reference.segment_loss(self.model, xs, y, state, self.loss, False)
            opt.zero_grad(set_to_none=False)
            (weight * seg_loss).backward()
            opt.step()
            state, loss = (state[0].detach(), state[1].detach()), seg_loss.detach()
        return loss

    def _train_batch_reduced(self, x, y) -> torch.Tensor:
        opt, rows = self._reduced, x.shape[1]
        opt.rows = rows
        # BPTT runs with clip=0 here (opt is not self.opt): ReducedStep clips the reduced gradient
        loss = self._sequence(opt, x, y)
        return torch.tensor(distributed.mean_over_rows(loss.item(), rows, self.dist.pg))


@torch.no_grad()
def _authors_head(model, opt=None, dist=None, device=None) -> None:
    """The authors' Add code initialises the head's weight with xavier_normal_ (under
    torchrun, rank 0's draw on every rank). `opt`, an FPTT optimiser built before this
    (FPTTLSTM's own), starts its W̄ from the new weight, as it would had it been built after."""
    torch.nn.init.xavier_normal_(model.head.weight)
    if dist is not None:
        distributed.broadcast_([model.head.weight], dist.pg, device)
    if opt is not None:
        opt.state[model.head.weight]["w_bar"].copy_(model.head.weight)


def make_trainer(cfg: Config, task, device: torch.device, dist=None) -> Trainer:
    """The one place that creates the model+optimiser pair (seeded with cfg.seed).

    FPTT on a fused backend (cpu, triton, cuda) with lstm="fused": fptt_fast.FPTTLSTM,
    whose train_segment is one fused step (one kernel launch on a GPU). FPTT on the
    reference backend, or with lstm="torch": reference.LSTMWithHead (torch's own LSTM
    for "torch") + fptt_fast.FPTT on the backend. BPTT: LSTMWithHead on torch's LSTM +
    torch.optim.Adam with global-norm clipping. The authors' protocol initialises the
    head's weight with xavier_normal_, as their code does.

    Under torchrun (`dist`): FPTTLSTM gets the process group (every fused backend: cpu,
    triton and cuda split their step around the all-reduce); the reference model takes
    rank 0's parameters before its optimiser is built."""
    backend = resolve_backend(cfg.backend, device)
    torch.manual_seed(cfg.seed)
    try:
        fptt_kw = dict(lr=cfg.lr, alpha=cfg.alpha, beta=cfg.beta, rho=cfg.rho,
                       decoupled=cfg.decoupled, clip=cfg.clip)
        authors = cfg.algo == "fptt" and cfg.protocol == "authors"
        if cfg.algo == "fptt" and backend != "reference" and cfg.lstm == "fused":
            try:
                model = FPTTLSTM(task.input_size, cfg.hidden, task.output_size, loss=task.loss,
                                 backend=backend, device=device, num_layers=cfg.layers,
                                 process_group=dist.pg if dist is not None else None, **fptt_kw)
            except NotImplementedError as e:
                raise UsageError(f"--backend {backend} cannot run under torchrun ({e})") from None
            if authors:
                _authors_head(model, model.optimizer, dist, device)
            what = "FPTTLSTM" if cfg.layers == 1 else f"FPTTLSTM, {cfg.layers} layers, a call per layer"
            return Trainer(model, model.optimizer, cfg, task.loss, f"{model.backend} ({what})", dist)
        model = reference.LSTMWithHead(task.input_size, cfg.hidden, task.output_size, device=device,
                                       num_layers=cfg.layers)
        if authors:
            _authors_head(model)
        if dist is not None:  # every rank starts from rank 0's parameters (as DDP does)
            distributed.broadcast_(list(model.parameters()), dist.pg, device)
        torch_lstm = "cuDNN" if device.type == "cuda" else "oneDNN"
        if cfg.algo == "fptt":
            opt = FPTT(model.parameters(), backend=backend, **fptt_kw)
            if cfg.lstm == "torch":  # torch's fused LSTM under autograd (the same function)
                model.lstm.torch_lstm = True
                backend = f"{backend} (torch's {torch_lstm} LSTM + fptt_fast.FPTT)"
        else:
            if cfg.lr < 0 or cfg.clip < 0:
                raise ValueError(f"lr and clip must be >= 0, got lr={cfg.lr}, clip={cfg.clip}")
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            model.lstm.torch_lstm = True  # torch's fused LSTM for the baseline (the same function)
            backend = f"torch.optim.Adam, {torch_lstm} LSTM"
    except ValueError as e:  # bad hyper-parameters, as FPTT/Adam validate them
        raise UsageError(str(e)) from None
    return Trainer(model, opt, cfg, task.loss, backend, dist)


# ----------------------------------------------------------------------------
# Files: atomic writes, checkpoints, CSV, plot
# ----------------------------------------------------------------------------


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file next to `path`, then os.replace it over `path`:
    a failure at any point leaves the previous file untouched (and no temp file)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        # torch.save reports a failed write as RuntimeError from its zip writer
        # (PytorchStreamWriter, inline_container.cc); other RuntimeErrors are bugs
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
                k in str(e) for k in ("PytorchStreamWriter", "inline_container"))):
            cause = " ".join((str(e).strip().splitlines() or [type(e).__name__])[:1])
            raise WriteError(f"cannot write {path}: {cause} (the previous version, if any, is "
                             f"intact)") from e
        raise


def save_checkpoint(path: str, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _first_line(e: Exception) -> str:
    """The first line of an error, unless it advises weights_only=False: loading a file
    of unknown origin that way runs whatever code it holds."""
    first = (str(e).strip().splitlines() or [""])[0]
    return type(e).__name__ if not first or "weights_only" in first else first


def load_checkpoint(path: str) -> dict:
    """Read and sanity-check a checkpoint (on the CPU, with torch's weights-only
    unpickler only); CheckpointError saying what the file is if it is no usable one."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a fptt_fast checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # objects other than tensors and plain containers: never ours, and not loaded
        # (torch's message suggests weights_only=False, which would run the file's code)
        raise CheckpointError(f"{path} is not a fptt_fast checkpoint (it holds Python objects that "
                              f"a checkpoint never does; not loaded, as that could run code)") from None
    except Exception as e:  # torch raises many types for corrupt/truncated archives
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): "
                              f"{_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a fptt_fast checkpoint (a torch file holding "
                              f"{_what_is(ckpt)}, without the {CKPT_FORMAT!r} format mark)")
    _check_layout(path, ckpt)
    return ckpt


def _what_is(obj) -> str:
    """A few words on what a torch file holds, to name a foreign file."""
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:4]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(obj) > 4 else ''}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _check_layout(path: str, ckpt: dict) -> None:
    """The keys and value types the rest of the code relies on, so that a damaged or
    hand-edited checkpoint ends in CheckpointError, not in a TypeError mid-way."""
    missing = [k for k in ("config", "step", "model", "optimizer", "data_rng", "torch_rng",
                           "python_rng", "history", "elapsed") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or \
            not set(RUN_FIELDS) - set(ADDED_FIELDS) <= set(ckpt["config"]):
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing or 'config fields'})")
    for f in dataclasses.fields(Config):
        value, want = ckpt["config"].get(f.name, f.default), type(f.default)
        if not (type(value) is want or (want is float and type(value) is int)):
            raise CheckpointError(f"checkpoint {path} is damaged: config {f.name}={value!r}")
    if not (type(ckpt["step"]) is int and isinstance(ckpt["elapsed"], (int, float))
            and isinstance(ckpt["history"], list) and isinstance(ckpt["model"], dict)
            and all(isinstance(t, torch.Tensor) for t in ckpt["model"].values())
            and isinstance(ckpt["optimizer"], dict)
            and isinstance(ckpt.get("task", {}), dict)):
        raise CheckpointError(f"checkpoint {path} is damaged (step, elapsed, history, model, optimizer "
                              f"or task)")


# ----------------------------------------------------------------------------
# Output paths: checked (and created) before training
# ----------------------------------------------------------------------------


def run_files_in(folder: str, names=RUN_FILES) -> list:
    """Those of a run's files (`names`, relative to `folder`) that `folder` holds."""
    return [n for n in names if os.path.lexists(os.path.join(folder, n))]


def _missing_folders(folder: str, option: str, given: str | None = None) -> list:
    """The folders to create for `folder`, outermost first; UsageError if the nearest
    existing one on the way up is not a folder (e.g. --save README.md/ck.pt). `given`:
    the path as the user gave it (a file in `folder`), for the message."""
    given = given or folder
    missing, p = [], os.path.normpath(folder)
    while p not in ("", os.sep) and not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if p and not os.path.isdir(p):
        what = option if p == os.path.normpath(given) else f"{option} {given}:"
        raise UsageError(f"{what} {p} is not a folder")
    return missing[::-1]


def check_folder(folder: str, option: str) -> None:
    """A folder the run will write into: it or its nearest existing parent is a folder.
    Creates nothing; see prepare_folders."""
    _missing_folders(folder, option)


def check_new_file(path: str, option: str, may_replace: str | None = None) -> None:
    """A file the run will write: a file name, not a folder, and not an existing file,
    which would be another run's, unless it is `may_replace` (the checkpoint resumed:
    the same run, continuing). Creates nothing; see prepare_folders."""
    if not os.path.basename(path):
        raise UsageError(f"{option} {path!r} names no file")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file path")
    if os.path.lexists(path) and not (may_replace and os.path.exists(path)
                                      and os.path.samefile(path, may_replace)):
        raise UsageError(f"{option} {path} already exists, and a run never overwrites another run's "
                         f"files: choose a new path")
    _missing_folders(os.path.dirname(path) or ".", option, given=path)


def prepare_folders(folders: list) -> None:
    """Create each (folder, option) with its missing parents and write and remove a
    probe file in it: proof, before minutes of training, that the run's files can be
    written there (/proc, a read-only mount, a full disk fail here, not at the first
    checkpoint). On failure the folders created here are removed, then UsageError."""
    created = []
    try:
        for folder, option in folders:
            for d in _missing_folders(folder, option):
                try:
                    os.mkdir(d)
                except OSError as e:
                    raise UsageError(f"{option}: cannot create folder {d} ({e.strerror})") from None
                created.append(d)
            try:
                fd, probe = tempfile.mkstemp(prefix=".fptt-fast-probe.", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise UsageError(f"{option}: cannot write in folder {folder} ({e.strerror})") from None
    except UsageError:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


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


def write_summary_csv(path: str, histories: dict, metric: str) -> None:
    """One row per evaluation of each run: {(variant, seed): history}."""
    def write(f):
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["variant", "seed", "step", "train_loss", metric, "elapsed_s"])
        for (label, seed), history in histories.items():
            for step, loss, test, elapsed in history:
                if test is not None:
                    w.writerow([label, seed, step, repr(loss), repr(test), f"{elapsed:.3f}"])
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def plot_variants(path: str, variants: dict, metric: str, title: str) -> None:
    """variants: {label: [history per seed]}. Train loss (mean over seeds of a running
    mean over 50 steps) and the test metric (mean over seeds, the band from the lowest to
    the highest seed) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_test) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, histories in variants.items():
        n = min(len(h) for h in histories)
        losses = torch.tensor([[r[1] for r in h[:n]] for h in histories], dtype=torch.float64)
        window = min(50, n)
        smooth = losses.cumsum(1)
        smooth[:, window:] = smooth[:, window:] - smooth[:, :-window].clone()
        smooth /= torch.arange(1, n + 1, dtype=torch.float64).clamp(max=window)
        line, = ax_loss.plot([r[0] for r in histories[0][:n]], smooth.mean(0).tolist(), label=label)
        steps = sorted(set.intersection(*({r[0] for r in h if r[2] is not None} for h in histories)))
        tests = torch.tensor([[dict((r[0], r[2]) for r in h)[s] for s in steps] for h in histories],
                             dtype=torch.float64)
        seeds = f" ({len(histories)} seeds)" if len(histories) > 1 else ""
        ax_test.plot(steps, tests.mean(0).tolist(), "o-", ms=3, color=line.get_color(),
                     label=label + seeds)
        if len(histories) > 1:
            ax_test.fill_between(steps, tests.min(0).values.tolist(), tests.max(0).values.tolist(),
                                 color=line.get_color(), alpha=0.2)
    ax_loss.set(xlabel="step (sequence batch)", ylabel="train loss (running mean of 50)",
                title="train loss")
    ax_test.set(xlabel="step (sequence batch)", ylabel=metric,
                title=metric.replace("_", " ") + ": mean, band = range over seeds")
    _finish_figure(path, fig, ax_loss, ax_test, metric, title)


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
    _finish_figure(path, fig, ax_loss, ax_test, metric, title)


def _finish_figure(path, fig, ax_loss, ax_test, metric, title) -> None:
    """The two panels' common finish (log scale and the 0.167 line for MSE), then the
    figure written atomically."""
    import matplotlib.pyplot as plt

    if metric == "test_mse":
        for ax in (ax_loss, ax_test):
            ax.set_yscale("log")
            ax.axhline(1 / 6, color="grey", ls="--", lw=1, label="predict 1.0 (0.167)")
    else:
        ax_test.set_ylim(0, 1)
    for ax in (ax_loss, ax_test):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------


def _agree_value(value) -> float:
    """A Config value as a number the ranks can compare (strings by checksum)."""
    if isinstance(value, str) or (isinstance(value, int) and abs(value) >= 2**53):
        return distributed.code(str(value))  # strings, and ints beyond float64's exact range
    return float(value)


def _model_layout(state: dict):
    """(kind, sizes) of a model state dict: kind 'reference' for reference.LSTMWithHead
    (keys 'lstm.*'), 'fused' for FPTTLSTM; sizes {input, hidden, output} from the
    shapes of weight_ih_l0 (4H x I) and head.weight (O x H), or None if keys are missing."""
    kind = "reference" if any(k.startswith("lstm.") for k in state) else "fused"
    w_ih = state.get("lstm.weight_ih_l0", state.get("weight_ih_l0"))
    head = state.get("head.weight")
    if w_ih is None or head is None or w_ih.dim() != 2 or head.dim() != 2:
        return kind, None
    return kind, {"input": w_ih.shape[1], "hidden": head.shape[1], "output": head.shape[0]}


def _check_model_fits(saved: dict, ours: dict) -> None:
    """Say why a checkpoint's model cannot load into this run's in the user's terms
    (sizes, backend), rather than as load_state_dict's tensor names and shapes."""
    (saved_kind, saved_sizes), (our_kind, our_sizes) = _model_layout(saved), _model_layout(ours)
    if saved_kind != our_kind:
        if saved_kind == "fused":
            raise CheckpointError("the checkpoint holds the fused FPTTLSTM model; --backend reference "
                                  "and --lstm torch train another one: resume with --backend auto, "
                                  "cpu, triton or cuda and --lstm fused")
        raise CheckpointError("the checkpoint holds the model of the reference backend or of --lstm "
                              "torch; resume it with the same option")
    if saved_sizes and our_sizes and saved_sizes != our_sizes:
        raise CheckpointError("; ".join(f"the checkpoint has {name} size {saved_sizes[name]}, this run "
                                        f"asks for {our_sizes[name]}" for name in ("input", "hidden", "output")
                                        if saved_sizes[name] != our_sizes[name]))


@contextlib.contextmanager
def _sigint_at_step_boundary():
    """Yields a function saying whether SIGINT arrived. A checkpoint taken in the middle
    of a step (a sequence's segments half applied) could not resume bitwise, so the
    first SIGINT only sets a flag that the loop reads between steps; a second one
    interrupts at once (KeyboardInterrupt), losing only the steps since the last save.
    Signals can only be handled in the main thread: elsewhere, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class Run:
    """A configured run: built (and, with a checkpoint, restored) without writing files.

    history: rows (step, train_loss, test metric or None, elapsed_s), one per step.

    Under torchrun (`dist`, fptt_fast.distributed.Dist): every rank draws the same global
    batch of cfg.batch rows (the same seeded generator) and trains on its own rows
    (distributed.shard_rows), so the batches do not depend on the number of processes
    and a checkpoint resumes on any number of them. Rank 0 alone evaluates, shows
    progress and writes files; every rank loads the same checkpoint to resume."""

    def __init__(self, cfg: Config, checkpoint: dict | None = None, download: bool = False,
                 dist=None):
        self.cfg = cfg
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = resolve_device(cfg.device)
        if dist is not None:
            try:
                self.rows = distributed.shard_rows(cfg.batch, dist.rank, dist.world)
            except ValueError as e:
                raise UsageError(f"--batch: {e}") from None
        self.task = make_task(cfg, self.device, download)
        self.trainer = make_trainer(cfg, self.task, self.device, dist)
        self.gen = torch.Generator().manual_seed(cfg.seed + DATA_SEED_OFFSET)
        self.step, self.elapsed, self.history = 0, 0.0, []
        self.interrupted_at_end = False
        if checkpoint is not None:
            self._restore(checkpoint)
        if dist is not None:  # the same command line and checkpoint step on every rank
            fields = [(f.name, _agree_value(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)
                      if f.name != "data_dir"] + [("the checkpoint's step", self.step)]
            try:
                distributed.agree(dist.pg, fields, "torchrun", self.device)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if checkpoint is not None and self.cfg.steps == self.step:
            # resuming would train nothing: say so instead of exiting 0
            raise UsageError(f"the checkpoint's run is complete (step {self.step} of {cfg.steps}); "
                             f"give --steps above {self.step} to train on")
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
                "task": self.task.state() if hasattr(self.task, "state") else {},
                "data_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate()}

    def _restore(self, ckpt: dict) -> None:
        _check_model_fits(ckpt["model"], self.trainer.model.state_dict())
        if hasattr(self.task, "load_state"):
            self.task.load_state(ckpt.get("task", {}))
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
    def save(self, csv_path: str, save_path: str) -> None:
        if not self.is_main:  # under torchrun rank 0 writes; the ranks hold the same state
            return
        write_csv(csv_path, self.history, self.task.metric)
        save_checkpoint(save_path, self.state())

    def _my_rows(self, x, y):
        """This rank's rows of a global batch (x time-major [T, B, I], y [B, ...])."""
        if self.dist is None:
            return x, y
        lo, hi = self.rows
        return x[:, lo:hi], y[lo:hi]

    def fit(self, out_dir: str, save_path: str | None = None, progress: bool = True) -> list:
        """Train up to cfg.steps, evaluating every eval_every steps and at the end; each
        evaluation rewrites the CSV and the checkpoint; the plot is drawn at the end.
        SIGINT: the CSV and checkpoint are written after the step under way, then
        Interrupted is raised."""
        from tqdm import tqdm

        cfg, trainer = self.cfg, self.trainer
        csv_path = os.path.join(out_dir, LOG_CSV)
        save_path = save_path or os.path.join(out_dir, CHECKPOINT)
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc=f"{cfg.task} {cfg.algo}",
                   disable=not (progress and self.is_main), dynamic_ncols=True, smoothing=0.1)
        start = time.perf_counter() - self.elapsed
        with _sigint_at_step_boundary() as interrupted:
            self._loop(bar, start, csv_path, save_path, interrupted)
            self.save(csv_path, save_path)  # a SIGINT from here on lets the run finish
            if self.is_main:
                plot_curves(os.path.join(out_dir, LOSS_PNG), {cfg.algo: self.history},
                            self.task.metric, cfg.describe())
            # a SIGINT during the last step or the final save: the run is whole, a caller
            # with more runs to go (compare) stops after it
            self.interrupted_at_end = interrupted()
        return self.history

    def _loop(self, bar, start, csv_path, save_path, interrupted) -> None:
        cfg, trainer = self.cfg, self.trainer
        try:
            while self.step < cfg.steps:
                x, y = self._my_rows(*self.task.batch(cfg.batch, self.gen, self.device))
                trainer.model.train()
                loss = trainer.train_batch(x, y).item()
                self.step += 1
                test = None
                if self.is_main and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    trainer.model.eval()
                    test = self.task.evaluate(trainer.model)
                self.elapsed = time.perf_counter() - start
                self.history.append((self.step, loss, test, self.elapsed))
                bar.update(1)
                if test is not None:
                    bar.set_postfix_str(f"loss={loss:.4g} {self.task.metric}={test:.4g}")
                    if self.step < cfg.steps:  # the last step's files are written by fit
                        self.save(csv_path, save_path)
                elif self.step % 10 == 0:
                    bar.set_postfix_str(f"loss={loss:.4g}")
                stop = interrupted()
                if self.dist is not None:  # every rank stops at the same step
                    stop = distributed.any_rank(stop, self.dist.pg)
                if stop and self.step < cfg.steps:
                    self.save(csv_path, save_path)
                    raise Interrupted(self.step, save_path)
        finally:
            bar.close()

    def final(self) -> tuple:
        """(step, train_loss, test metric) of the last evaluated step."""
        tested = [r for r in self.history if r[2] is not None]
        if not tested:
            return self.step, None, self.task.evaluate(self.trainer.model)
        return tested[-1][:3]
