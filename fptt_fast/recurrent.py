"""One recurrent FPTT module for every cell: fptt_fast.recurrent.FPTTRecurrent.

A cell (fptt_fast.cells.Cell: its shapes, state, reference math and kernels) plus a
linear head, trained by FPTT one segment at a time: the checks, train_segment,
train_sequence, CUDA graphs, state dicts and the data-parallel path, whatever the cell.
fptt_fast.FPTTLSTM (lstm.py) and fptt_fast.FPTTGRU (gru.py) are its cells' classes; their
docstrings say what the user sees. Backends: fptt_fast/backends (which segment kernel
runs, and a stack's layer-by-layer segment).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import backends, reference
from .cells import Cell
from .layout import LOSS_CODE  # noqa: F401 (re-exported: the loss codes)
from .optim import FPTT, GraphCache
from .backends import cuda as cuda_backend
from .backends.base import gradient_buffers, stacked_segment

LOSSES = ("mse", "ce")
HEAD_KEYS = ("head.weight", "head.bias")
SEGMENT_BACKENDS = backends.BACKENDS  # resolution: backends.resolve_segment
# The CUDA backend's kernels (csrc/cuda/lstm_persistent.cu, csrc/cuda/lstm_segment.cu):
# "auto" runs the persistent weight-stationary kernel where the shape fits it, else the
# general one (fptt_fast/backends/cuda.py).
CUDA_KERNELS = cuda_backend.KERNELS
# The Triton backend's kernels (kernels/lstm_segment.py: general; kernels/lstm_persistent.py:
# weight-stationary, K segments per launch, H <= 128, I <= 32, O <= 32, not yet measured on
# a GPU): the values of a module's triton_kernel attribute.
TRITON_KERNELS = ("general", "persistent")


class FPTTRecurrent(nn.Module):
    """A recurrent network of `cell` (torch's parameter names, shapes, gate order and
    stacking) with a linear head nn.Linear(H, O), trained by FPTT: the base of FPTTLSTM
    and FPTTGRU (a subclass sets `cell`; see their docstrings).

    Args:
        input_size, hidden_size, output_size: I, H, O (each >= 1).
        loss: "mse" (regression, float targets) or "ce" (class indices).
        per_step: a target per time step (loss = mean over the segment's steps) instead of
            one terminal target predicted from the segment's last hidden state.
        lr, optimizer, betas, eps, weight_decay, momentum, dampening, nesterov, alpha, beta,
            rho, c, decoupled, clip, nonfinite: fptt_fast.FPTT's keyword arguments (alpha=0:
            the regulariser off; decoupled=True: applied outside the clip and optimiser).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see the module docstring).
        device, dtype: where the parameters live; only torch.float32 is supported.
        allow_tf32: let the GPU backends use TF32 matmuls (off: IEEE fp32). The cpu and
            reference backends always compute in IEEE fp32.
        cuda_kernel: on the cuda backend, "auto" (the persistent weight-stationary kernel
            where the shape fits it: H <= 128, I <= 32, O <= 32, Hopper; else the general
            one), "persistent" (raise if it cannot run) or "general". `last_kernel` says
            which one ran.
        batch_first: x is [B, omega, I] and per-step targets [B, omega, ...], outputs
            [B, omega, O], as torch's modules (batch_first=True); the state keeps its shape.
            The kernels run time-major: such inputs are transposed (one copy) first.
        check_inputs: check inputs for NaN/inf (ValueError) and class targets for range
            (ValueError). That reads the data, a host sync on a GPU: None (default) checks on
            the CPU only. Shapes, dtypes and devices are always checked.
        process_group: a torch.distributed.ProcessGroup: data-parallel training, each rank
            passing its own rows of every batch (README, "Scaling out"). At construction one
            all_gather checks that all ranks have the same sizes, loss, hyper-parameters and
            backend (ValueError naming the field) and the parameters are broadcast from the
            group's rank 0. Each train_segment then runs the segment's gradients, ONE
            all_reduce of a flat buffer [gradients, loss, rows] (the mean over all ranks'
            rows) and the clip and FPTT update, identical on every rank; the loss returned
            is that global mean. cpu: two C++ calls around the all_reduce; triton and cuda:
            the segment kernel with its update switched off, then the backend's fused FPTT
            update launch (the backend's segment with update off), so a segment is two
            launches and the all_reduce instead of one launch (train_sequence on cuda: one
            such step per segment, not the K-segment launch); reference: autograd. Every
            rank must call train_segment / train_sequence in step, with segments of the
            same length.
    """

    cell = None  # the subclass's fptt_fast.cells.Cell

    def __init__(self, input_size, hidden_size, output_size, *, loss="mse", per_step=False,
                 lr=1e-3, optimizer="adam", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum=0.0, dampening=0.0, nesterov=False, alpha=0.5, beta=0.5, rho=0.0,
                 c=1.0, decoupled=False, clip=None, nonfinite="raise", backend="auto", device=None,
                 dtype=torch.float32, allow_tf32=False, check_inputs=None, cuda_kernel="auto",
                 batch_first=False, num_layers=1, process_group=None):
        super().__init__()
        if not isinstance(self.cell, Cell):
            raise TypeError("FPTTRecurrent is a base class: use FPTTLSTM or FPTTGRU (or a "
                            "subclass that sets `cell`)")
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("output_size", output_size), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if dtype != torch.float32:
            raise TypeError(f"{self.cell.title} supports dtype=torch.float32 only, got {dtype}")
        if cuda_kernel not in CUDA_KERNELS:
            raise ValueError(f"cuda_kernel must be one of {tuple(CUDA_KERNELS)}, got {cuda_kernel!r}")
        self.cuda_kernel = cuda_kernel
        # The Triton kernel of the triton backend: "general" (kernels/lstm_segment.py), or,
        # set on the module, "persistent" (kernels/lstm_persistent.py): an experiment, not
        # a constructor argument until it is measured on a GPU (README, "Backends").
        self.triton_kernel = "general"
        # the CUDA or Triton kernel the last train_segment / train_sequence ran
        # ("persistent" or "general"); None before the first one or on other backends
        self.last_kernel = None
        I, H, O = input_size, hidden_size, output_size
        self.input_size, self.hidden_size, self.output_size = I, H, O
        self.loss, self.per_step = loss, bool(per_step)
        if not isinstance(batch_first, bool):
            raise ValueError(f"batch_first must be True or False, got {batch_first!r}")
        self.batch_first = batch_first
        self.allow_tf32, self.check_inputs = bool(allow_tf32), bool(check_inputs)  # None: below
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r}: no CUDA device is available here "
                               f"(torch.cuda.is_available() is False); use device='cpu'")
        kw = dict(device=device, dtype=dtype)
        self.num_layers = num_layers
        self._param_names = reference.layer_names(num_layers) + list(HEAD_KEYS)
        reference.init_rnn_parameters(self, I, H, num_layers, self.cell.gates, **kw)  # torch's
        self.head = nn.Linear(H, O, **kw)
        self.requested_backend = backend
        dev_type = self.weight_hh_l0.device.type
        self.backend, opt_backend = backends.resolve_segment(backend, dev_type, (I, H, O),
                                                             self.allow_tf32, cell=self.cell)
        if backend == "auto" and dev_type == "cuda" and not self._gpu_verified():
            # what has not run on a GPU yet (a stack's layer launches, the GRU's kernels)
            # is chosen with an explicit backend; auto keeps the reference segment math
            # with the device's fused update
            self.backend, opt_backend = "reference", self.backend
        self._engine.check_module(self)  # self._engine: set with self.backend (__setattr__)
        if check_inputs is None:  # reading the values is a host sync on a GPU
            self.check_inputs = dev_type == "cpu"
        self._opt_kwargs = dict(lr=lr, optimizer=optimizer, betas=betas, eps=eps,
                                weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                                nesterov=nesterov, alpha=alpha, beta=beta, rho=rho, c=c,
                                decoupled=decoupled, clip=clip,
                                nonfinite=nonfinite, backend=opt_backend)
        self.optimizer = FPTT(self.fptt_parameters(), **self._opt_kwargs)
        self._grads = None      # gradient buffers of the cpu backend, allocated once
        self._workspace = None  # its scratch memory, grown on demand and reused
        # cpu backend: True uses the torch-free built-in OpenMP GEMM instead of at::mm. On by
        # default for tiny models (4H x max(I, H, O) <= 256 weights per product), where the
        # seven ATen calls' dispatch costs more than their arithmetic (9.4 -> 4.8 us
        # per train_segment at I=2, H=2, O=1 on 2 cores); both are deterministic.
        self.cpu_builtin_gemm = self.cell.gates * H * max(I, H, O) <= 256
        # cpu backend: the plan whose train() is train_segment's fast path (see there); set
        # by the cpu backend's segment (backends/cpu.py), dropped whenever an attribute it depends on is assigned (__setattr__)
        self._cpu_fast = None
        # data parallel (fptt_fast.distributed): ranks checked, parameters from rank 0
        self.process_group, self._dist = None, None
        if process_group is not None:
            from . import distributed
            self._dist = distributed.attach_fpttlstm(self, process_group)
            self.process_group = process_group

    def _gpu_verified(self) -> bool:
        """Whether the fused segment kernels of this module's shape have run on a GPU:
        one layer of a cell whose GPU kernels have (Cell.gpu_verified)."""
        return self.num_layers == 1 and self.cell.gpu_verified

    # Assigning any of these drops the cpu fast path's plan (_cpu_fast): it was built for
    # their values (the optimiser, the buffers, the loss and the flags it bakes in).
    _FAST_PATH_DEPENDS_ON = frozenset({
        "optimizer", "_grads", "_workspace", "loss", "per_step", "check_inputs",
        "cpu_builtin_gemm", "backend", "_engine", "_dist", "process_group", "input_size",
        "hidden_size", "output_size"})

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "backend":  # the backend object follows the name
            super().__setattr__("_engine", backends.engine(value))
        if name in FPTTRecurrent._FAST_PATH_DEPENDS_ON:
            self.__dict__["_cpu_fast"] = None

    # -- parameters and state dicts ---------------------------------------------------
    def fptt_parameters(self):
        """The parameters in the optimiser's order: torch's module's (nn.LSTM, nn.GRU), layer
        by layer (reference.layer_names), then head.weight, head.bias."""
        return [self.get_parameter(n) for n in self._param_names]

    def cell_state_dict(self):
        """{weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ... (each layer),
        head.weight, head.bias} (copies). The cell's load into torch's module (nn.LSTM,
        nn.GRU) of the same sizes as they are; head.* (without the prefix) into
        nn.Linear(H, O)."""
        return {n: p.detach().clone() for n, p in zip(self._param_names, self.fptt_parameters())}

    @torch.no_grad()
    def load_cell_state_dict(self, state_dict, head=None):
        """Load a state dict of torch's module of this cell (nn.LSTM, nn.GRU; I, H,
        num_layers; with biases; keys may carry the cell's prefix, 'lstm.' or 'gru.', as in
        reference.LSTMWithHead), optionally with head.weight/head.bias, or the head from
        `head` (an nn.Linear(H, O) state dict). Everything is checked before anything is
        written. The FPTT state starts afresh (w_bar = w, lam = 0, optimiser buffers zero),
        as for a new module."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        prefix = self.cell.name + "."
        sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
        if head is not None:
            sd.update({"head." + k: v for k, v in head.items()})
        names = self._param_names
        unknown = sorted(set(sd) - set(names))
        if unknown:
            raise ValueError(f"unexpected keys {unknown} (an nn.{self.cell.name.upper()} with "
                             f"num_layers={self.num_layers} and biases, and an nn.Linear head, "
                             f"have {names})")
        params = dict(zip(names, self.fptt_parameters()))
        todo = []
        for name in names:
            if name not in sd:
                if name in HEAD_KEYS:
                    continue
                raise ValueError(f"state_dict misses {name!r}")
            t = torch.as_tensor(sd[name])
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(params[name].shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} has dtype {t.dtype}, expected a floating dtype")
            todo.append((params[name], t))
        for p, t in todo:
            p.copy_(t)
        self.optimizer = FPTT(self.fptt_parameters(), **self._opt_kwargs)

    # -- input checks -------------------------------------------------------------------
    def _device(self):
        return self.weight_hh_l0.device

    def _check_device(self):
        if self.optimizer.flat_state["lam"].device != self._device():
            raise RuntimeError("the parameters moved to another device after construction; the "
                               "FPTT state did not: build the module with device=...")
        for n, p in zip(self._param_names, self.fptt_parameters()):
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise TypeError(f"parameter {n} must stay a contiguous float32 tensor, got "
                                f"{p.dtype} ({self.cell.title} supports float32 only)")

    def _check_finite(self, t, name):
        if self.check_inputs and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or inf")

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.input_size or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must be time-major [omega >= 1, B >= 1, I={self.input_size}], "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.device != self._device():
            raise ValueError(f"x is on {x.device}, the module on {self._device()}")
        self._check_finite(x, "x")
        return x.contiguous()

    def _check_state(self, state, B):
        """The state as a tuple of the cell's tensors ((h, c) or (h,)), each [B, H] for one
        layer, [L, B, H] for a stack; None: zeros. A one-tensor state (a GRU's h) may be
        given as the tensor, as torch's module takes it."""
        H, L = self.hidden_size, self.num_layers
        names = self.cell.states
        shape = (B, H) if L == 1 else (L, B, H)  # one layer: [B, H], as before stacking
        what = f"[B={B}, H={H}]" if L == 1 else f"[L={L}, B={B}, H={H}]"
        if state is None:
            return tuple(torch.zeros(shape, device=self._device(), dtype=torch.float32)
                         for _ in names)
        if len(names) == 1 and isinstance(state, torch.Tensor):
            state = (state,)
        if not (isinstance(state, (tuple, list)) and len(state) == len(names)):
            form = "[B, H]" if L == 1 else "[L, B, H]"
            raise ValueError(f"state must be a pair (h, c) of {form} tensors" if len(names) == 2
                             else f"state must be the tensor h {form}")
        out = []
        for name, t in zip(names, state):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"state {name} must have shape {what}, got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"state {name} must be float32, got {t.dtype}")
            if t.device != self._device():
                raise ValueError(f"state {name} is on {t.device}, the module on {self._device()}")
            self._check_finite(t, f"state {name}")
            out.append(t.detach().contiguous())
        return tuple(out)

    def _check_layout(self, target, omega, B):
        """A terminal target with omega rows where x has B: x was most likely given
        batch-first to a time-major module; say so rather than blame the target."""
        if (isinstance(target, torch.Tensor) and target.dim() >= 1 and omega != B
                and not self.batch_first and not self.per_step and target.shape[0] == omega):
            raise ValueError(f"target has {omega} rows but x [omega={omega}, B={B}, I] has batch {B}: "
                             f"x is read time-major [omega, B, I]; for batch-first x [B, omega, I] "
                             f"build the module with batch_first=True")

    def _check_target(self, target, omega, B):
        O = self.output_size
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor, got {type(target).__name__}")
        lead = (omega, B) if self.per_step else (B,)
        what = "[omega, B]" if self.per_step else "[B]"
        if target.device != self._device():
            raise ValueError(f"target is on {target.device}, the module on {self._device()}")
        if self.loss == "mse":
            if tuple(target.shape) != lead + (O,):
                raise ValueError(f"mse target must have shape {what[:-1]}, O] = {list(lead + (O,))}, "
                                 f"got {tuple(target.shape)}")
            if target.dtype != torch.float32:
                raise TypeError(f"mse target must be float32, got {target.dtype}")
            self._check_finite(target, "target")
            return target.contiguous()
        if tuple(target.shape) != lead:
            raise ValueError(f"ce target must hold class indices of shape {what} = {list(lead)}, "
                             f"got {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"ce target must hold integer class indices, got {target.dtype}")
        target = target.to(torch.int64).contiguous()
        if self.check_inputs and target.numel():
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= O:
                raise ValueError(f"ce target classes must be in [0, {O - 1}] (output_size={O}), "
                                 f"got values in [{lo}, {hi}]")
        return target

    @staticmethod
    def _check_weight(weight):
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"weight must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0 (a segment's share of the loss), "
                             f"got {weight!r}")
        return w

    def _inputs(self, x, target, state, weight):
        self._check_device()
        x = self._check_x(x)
        omega, B = x.shape[0], x.shape[1]
        self._check_layout(target, omega, B)
        return (x, self._check_target(target, omega, B), self._check_state(state, B),
                self._check_weight(weight))

    # -- evaluation -----------------------------------------------------------------------
    def forward(self, x, state=None):
        """Head outputs at every step [omega, B, O] ([B, omega, O] with batch_first) and
        the final state, as torch's module returns it. Differentiable (plain torch ops: the
        cell's reference math, Cell.layer, on this module's parameters)."""
        self._check_device()
        x, _ = self._time_major(x, None)
        x = self._check_x(x)
        state = self._check_state(state, x.shape[1])
        outs, state = reference.stacked(self.cell.layer, self, x, state, self.num_layers)
        out = self.head(outs)
        return (out.transpose(0, 1) if self.batch_first else out), self.cell.public_state(state)

    def _time_major(self, x, target):
        """(x, target) as the kernels take them: batch_first inputs transposed (contiguous)
        to [omega, B, ...]; per-step targets checked against x's [B, omega] first, so that a
        mismatch is reported in the caller's layout."""
        if not self.batch_first:
            return x, target
        I = self.input_size
        if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[2] == I
                and x.shape[0] >= 1 and x.shape[1] >= 1):
            if not isinstance(x, torch.Tensor):
                return x, target  # _check_x names the type
            raise ValueError(f"x must be batch-first [B >= 1, omega >= 1, I={I}] (batch_first=True), "
                             f"got shape {tuple(x.shape)}")
        if self.per_step and isinstance(target, torch.Tensor):
            want = tuple(x.shape[:2]) + ((self.output_size,) if self.loss == "mse" else ())
            if tuple(target.shape) != want:
                what = "[B, omega, O]" if self.loss == "mse" else "[B, omega]"
                raise ValueError(f"per-step {self.loss} target must have shape {what} = {list(want)} "
                                 f"(batch_first=True), got {tuple(target.shape)}")
            target = target.transpose(0, 1).contiguous()
        return x.transpose(0, 1).contiguous(), target

    # -- training -------------------------------------------------------------------------
    def _reference_loss(self, x, target, state):
        outs, new_state = reference.stacked(self.cell.layer, self, x, state, self.num_layers)
        pred = self.head(outs) if self.per_step else self.head(outs[-1])
        return reference.task_loss(pred, target, self.loss), new_state

    def _launch(self, x, target, state, weight, n_segs=1, ramp=False):
        """The backend's one-call run of n_segs segments over x (segment p weighted
        (p + 1) / n_segs if ramp else `weight`), with the optimiser's status bookkeeping
        around it: no host sync. Returns the losses [n_segs] and the final state."""
        self.optimizer.device_step_begin()
        out = self._launch_only(x, target, state, weight, n_segs, ramp)
        self.optimizer.device_step_end()
        return out

    def _launch_only(self, x, target, state, weight, n_segs=1, ramp=False):
        """_launch without the bookkeeping (no event, no host work but the launch): what a
        CUDA graph captures."""
        return self._engine.sequence(self, x, target, state, n_segs, ramp, weight=weight)

    def loss_and_grads(self, x, target, state=None, weight=1.0):
        """The segment's loss, new state and the task gradients of weight * loss, as
        {name: tensor} (fptt_parameters' names), without any update. For tests and
        diagnostics."""
        x, target = self._time_major(x, target)
        x, target, state, weight = self._inputs(x, target, state, weight)
        loss, state = self._segment(x, target, state, weight, False)
        return (loss.reshape(()), self.cell.public_state(state),
                {n: g.clone() for n, g in zip(self._param_names, self._grads)})

    def train_segment(self, x, target, state=None, weight=1.0):
        """One FPTT update from one segment. Returns (unweighted loss, the new state
        detached, as torch's module returns it: (h, c) for an LSTM, h for a GRU)."""
        x, target = self._time_major(x, target)
        loss, state = self._train_segment(x, target, state, weight)
        return loss, self.cell.public_state(state)

    def _train_segment(self, x, target, state, weight):
        """train_segment on time-major inputs."""
        # cpu backend, the common case: ONE C++ call that checks the inputs itself and runs
        # the segment (_C.CpuLstmPlan.train, csrc/bind_lstm.cpp); None, having done nothing,
        # when anything is unusual: the checks below then raise today's errors or take it.
        fast = self._cpu_fast
        if fast is not None:
            out = fast.train(x, target, state, weight)
            if out is not None:
                return out
        x, target, state, weight = self._inputs(x, target, state, weight)
        if self._dist is not None:
            return self._distributed_step(x, target, state, weight)
        return self._segment(x, target, state, weight, True)

    def _segment(self, x, target, state, weight, update):
        """The backend's segment on checked inputs; a stack of layers on a fused backend
        runs layer by layer (backends.base.stacked_segment), on the reference through
        autograd."""
        if self.num_layers > 1 and self._engine.layered:
            return stacked_segment(self._engine, self, x, target, state, weight, update)
        return self._engine.segment(self, x, target, state, weight, update)

    def _distributed_step(self, x, target, state, weight):
        """train_segment with a process group: this rank's gradients of weight * loss
        (the backend's segment with update off: cpu, the C++ step; triton, cuda, the
        segment kernel with its update switched off; reference, autograd), one
        all_reduce of the flat buffer [gradients, loss, rows]
        (fptt_fast.distributed.FlatAllReduce: the gradient and loss of the mean over every
        rank's rows), then the clip and FPTT update by self.optimizer (cpu: the fused C++
        update; triton, cuda: the fused update launch) on that gradient, the same on every
        rank. p.grad keeps the reduced gradient."""
        params = self.fptt_parameters()
        loss, state = self._segment(x, target, state, weight, False)
        grads = self._grads
        loss, reduced = self._dist.reduce(grads, loss, x.shape[1])
        for p, g in zip(params, reduced):
            p.grad = g
        self.optimizer.step()
        return loss, state

    def train_sequence(self, x, target, K, state=None, graph=None, weights="ramp"):
        """FPTT over one batch of sequences x [T, B, I] ([B, T, I] with batch_first): K segments of ceil(T/K) steps,
        state carried (detached) from `state` (zeros if None), one update per segment.
        Terminal: segment p predicts `target` from its last state, weighted as `weights`
        says (reference.segment_weights: "ramp", (p+1)/K; "authors", p + 1/K);
        per-step: each segment takes its own targets, weight 1. Returns the K unweighted
        segment losses as a tensor [K].

        graph (cuda backend): None or True replays the K segments from a CUDA graph,
        captured on the first call per shape (see _graphed_sequence); False launches
        eagerly. Other backends run eagerly (graph=True raises ValueError there)."""
        if graph is not None and not isinstance(graph, bool):
            raise ValueError(f"graph must be None, True or False, got {graph!r}")
        if graph and not self._engine.graphs:
            raise ValueError(f"graph=True needs the cuda backend, this module runs "
                             f"{self.backend!r}")
        if graph and self.num_layers > 1:
            raise ValueError(f"graph=True replays the one-launch kernels, which run one layer; "
                             f"num_layers={self.num_layers} runs one launch per layer (leave "
                             f"graph out)")
        if graph and weights != "ramp" and not self.per_step:
            raise ValueError(f"graph=True runs the kernels' ramp weights; weights={weights!r} "
                             f"runs the segments one call each (leave graph out)")
        self._check_device()
        x, target = self._time_major(x, target)
        x = self._check_x(x)
        if self.per_step:
            target = self._check_target(target, x.shape[0], x.shape[1])
        else:
            self._check_layout(target, x.shape[0], x.shape[1])
        bounds = reference.segment_bounds(x.shape[0], int(K))
        if self.per_step and weights != "ramp":
            raise ValueError(f"weights={weights!r} weighs terminal segments; per-step segments weigh 1")
        seg_weights = reference.segment_weights(len(bounds), weights)
        # all K segments in one call: cuda (one C++ call), triton's persistent kernel (one
        # launch); their kernels weight the segments by the ramp
        one_launch = self._engine.one_launch(self) and (self.per_step or weights == "ramp")
        if one_launch and self._dist is None:
            B = x.shape[1]
            if not self.per_step:
                target = self._check_target(target, 1, B)
            state = self._check_state(state, B)
            if graph is not False and self._engine.graphs:
                return self._graphed_sequence(x, target, state, len(bounds))
            losses, _ = self._launch(x, target, state, 1.0,
                                     n_segs=len(bounds), ramp=not self.per_step)
            return losses
        losses = []
        for p, (a, b) in enumerate(bounds):
            tgt = target[a:b] if self.per_step else target
            weight = 1.0 if self.per_step else seg_weights[p]
            loss, state = self._train_segment(x[a:b], tgt, state, weight)
            losses.append(loss)
        return torch.stack(losses)

    # -- CUDA graphs (cuda backend) ------------------------------------------------------
    # At most this many captured train_sequence graphs per module (least recently used
    # dropped); each holds static copies of its inputs and its outputs.
    MAX_GRAPHS = 8

    def _graph_key(self, x, target, n_segs):
        """What a captured launch bakes in: the shapes and dtypes of its inputs, the segment
        count, the kernel arguments that are not read from memory (clip, optimiser, kernel
        choice) and the address of every tensor it reads or writes outside its inputs
        (parameters, gradient buffers, FPTT state, hyper table, status). Hyper-parameter
        *values* are not in it: the kernels read them from the table, which FPTT refreshes
        in place (_hyper_table) before each replay."""
        opt = self.optimizer
        st = opt.kernel_state(self.fptt_parameters(), self._grads, x.device)
        return (tuple(x.shape), tuple(target.shape), target.dtype, n_segs, self.per_step,
                self.loss, st.clip, st.optimizer, self.cuda_kernel, self.allow_tf32,
                tuple(p.data_ptr() for p in st.params), tuple(g.data_ptr() for g in st.grads),
                tuple(t.data_ptr() for t in (*st.w_bar, *st.lam, *st.exp_avg, *st.exp_avg_sq,
                                             *st.step)),
                st.hyper.data_ptr(), st.status.data_ptr(), x.device, tuple(st.group_of))

    def _graphed_sequence(self, x, target, state, n_segs):
        """train_sequence's cuda launch through a CUDA graph. The first call per key
        (_graph_key) runs the launch eagerly from static copies of the inputs (the glue's
        tables and scratch are built: the warm-up it requires before a capture, and this
        call's real work), then captures the same launch into a torch.cuda.CUDAGraph on a
        side stream (capture runs nothing). Later calls copy the inputs into the static
        buffers, refresh the hyper table in place and replay. The losses are cloned out
        of the graph's output. Bitwise the eager launch: the same kernels, arguments and
        memory."""
        opt = self.optimizer
        opt.device_step_begin()
        gradient_buffers(self)  # the eager launch would allocate them; the key needs them
        # (the key's kernel_state validates and refreshes the hyper table, in place)
        graphs = self.__dict__.get("_graphs")
        if graphs is None:  # a plain attribute (not a buffer); copies and pickles empty
            graphs = self.__dict__["_graphs"] = GraphCache()
        key = self._graph_key(x, target, n_segs)
        ramp = not self.per_step
        entry = graphs.pop(key, None)
        if entry is None:
            static = (x.clone(), target.clone(), *(t.clone() for t in state))
            losses, _ = self._launch_only(*static[:2], static[2:], 1.0, n_segs=n_segs, ramp=ramp)
            out = losses.clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            g = torch.cuda.CUDAGraph()
            # stream=side: torch.cuda.graph's own default capture stream is made once per
            # process, on whichever device was current then
            with torch.cuda.stream(side), torch.cuda.graph(g, stream=side):
                g_losses, _ = self._launch_only(*static[:2], static[2:], 1.0, n_segs=n_segs,
                                                ramp=ramp)
            torch.cuda.current_stream(x.device).wait_stream(side)
            entry = (g, static, g_losses, self.last_kernel)
            while len(graphs) >= self.MAX_GRAPHS:
                graphs.pop(next(iter(graphs)))
        else:
            g, static, g_losses, kernel = entry
            for dst, src in zip(static, (x, target, *state)):
                dst.copy_(src)
            g.replay()
            out = g_losses.clone()
            self.last_kernel = kernel  # the kernel this graph captured
        graphs[key] = entry  # most recently used last
        opt.device_step_end()
        return out

    def extra_repr(self):
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"output_size={self.output_size}, loss={self.loss!r}, per_step={self.per_step}, "
                f"backend={self.backend!r}" + (", batch_first=True" if self.batch_first else "")
                + (f", num_layers={self.num_layers}" if self.num_layers > 1 else ""))
