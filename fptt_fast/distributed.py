"""Data-parallel FPTT across processes with torch.distributed (README, "Scaling out").

Every rank holds the same model and FPTT state and trains on its own rows of each batch.
Per FPTT update the ranks agree on one gradient: the gradient of the *global* batch mean,
all-reduced in one flat buffer, after which every rank clips and updates identically.

Used by:
  fptt_fast.FPTTLSTM(..., process_group=pg)  every backend: local gradients (cpu: the C++
      step with update=False; triton, cuda: the segment kernel with its update switched
      off; reference: autograd: the backend object's segment with update=False) -> one all_reduce of [gradients...,
      loss, rows] -> clip and FPTT update by the module's fptt_fast.FPTT (the fused update
      of that backend) (FlatAllReduce, attach_fpttlstm)
  the command line under torchrun (fptt_fast.train): init_from_env, shard_rows,
      ReducedStep (the reference model's optimiser step after an all-reduce), any_rank
  your own model: wrap it in torch.nn.parallel.DistributedDataParallel and step
      fptt_fast.FPTT as usual (DDP all-reduces p.grad during backward; tested).

Rows of unequal shards: each rank's gradient is weighted by its row count before the sum
and the sum divided by the total, so B rows split 4 + 3 give the gradient of the mean over
all 7 rows (the mean of the two shard means would weight the 3 rows more).
"""
from __future__ import annotations

import datetime
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Collectives time out after this (gloo's default is 30 minutes): a rank that died or
# never reached a collective shows up as an error instead of a silent hang.
TIMEOUT = datetime.timedelta(minutes=5)


def _require_group(pg, what: str):
    if not dist.is_available():
        raise RuntimeError(f"{what}: torch.distributed is not available in this torch build")
    if not isinstance(pg, dist.ProcessGroup):
        raise TypeError(f"{what}: process_group must be a torch.distributed.ProcessGroup "
                        f"(e.g. torch.distributed.group.WORLD or dist.new_group(...)), "
                        f"got {type(pg).__name__}")
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError(f"{what}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the process group")
    return rank, dist.get_world_size(pg)


def _collective_device(pg, device: torch.device | None = None) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only (`device`, or
    the current GPU), gloo CPU ones (it takes CUDA tensors for some collectives only)."""
    if dist.get_backend(pg) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device(
        "cuda", torch.cuda.current_device())


def code(text: str) -> float:
    """A string as a number that ranks can compare (exact in float64)."""
    return float(zlib.crc32(text.encode()))


def agree(pg, fields, what: str, device=None) -> None:
    """One all_gather of `fields` ((name, number) pairs, numbers exact in float64):
    ValueError naming the first field the ranks disagree on, and every rank's value.
    Every rank raises, so none is left waiting in a later collective."""
    rank, world = _require_group(pg, what)
    mine = torch.tensor([float(v) for _, v in fields], dtype=torch.float64,
                        device=_collective_device(pg, device))
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=pg)
    table = torch.stack(rows).cpu()
    for j, (name, _) in enumerate(fields):
        col = table[:, j]
        if not bool((col == col[0]).all()):
            values = ", ".join(f"rank {r}: {_show(v)}" for r, v in enumerate(col.tolist()))
            raise ValueError(f"{what}: the ranks of the process group disagree on {name} "
                             f"({values}); every rank must be built with the same sizes and "
                             f"hyper-parameters")


def _show(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else f"{v:.9g}"


@torch.no_grad()
def broadcast_(tensors, pg, device) -> None:
    """Overwrite `tensors` (one device) with group rank 0's values: one broadcast of a
    flat copy."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(_collective_device(pg, device))
    dist.broadcast(flat, src=dist.get_global_rank(pg, 0), group=pg)
    flat = flat.to(device)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class FlatAllReduce:
    """The one all_reduce of an FPTT update: a flat float32 buffer
    [gradients of every parameter..., loss, rows] (P + 2 floats, allocated once).

    reduce(grads, loss, rows) writes rows * grad and rows * loss into it, sums it over
    the group and divides by the summed rows: afterwards it holds the gradient and the
    loss of the mean over all ranks' rows, bitwise the same on every rank. Returns
    (global mean loss as a 0-dim tensor, the gradients as views shaped like `params`)."""

    def __init__(self, params, pg):
        self.pg = pg
        self.rank, self.world = _require_group(pg, "FlatAllReduce")
        p0 = params[0]
        self.device = p0.device
        self.n = sum(p.numel() for p in params)
        self.flat = torch.zeros(self.n + 2, dtype=torch.float32, device=self.device)
        self.grads, offset = [], 0
        for p in params:
            self.grads.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self._staging = None  # a copy where the backend reduces (gloo: CPU) if not here

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @torch.no_grad()
    def reduce(self, grads, loss, rows: int):
        n, flat = self.n, self.flat
        for view, g in zip(self.grads, grads):
            torch.mul(g.detach(), float(rows), out=view)
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        flat[n] = loss.to(self.device, torch.float32) * float(rows)
        flat[n + 1] = float(rows)
        where = _collective_device(self.pg, self.device)
        if where != self.device:
            if self._staging is None:
                self._staging = torch.empty_like(flat, device=where)
            self._staging.copy_(flat)
            dist.all_reduce(self._staging, op=dist.ReduceOp.SUM, group=self.pg)
            flat.copy_(self._staging)
        else:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.pg)
        flat[:n + 1].div_(flat[n + 1])
        return flat[n].clone(), self.grads


# -- FPTTLSTM ---------------------------------------------------------------------------

# FPTTLSTM backends that can run with a process group: every one. The one-launch backends
# (triton, cuda) run their segment kernel with the update switched off (their backend
# object's segment with update=False: fptt_fast/backends/triton.py, cuda.py).
SPLIT_BACKENDS = ("cpu", "reference", "triton", "cuda")


def attach_fpttlstm(module, pg) -> FlatAllReduce:
    """FPTTLSTM(..., process_group=pg) at construction: one all_gather checks that every
    rank has the same sizes, loss, hyper-parameters and backend (ValueError naming the
    field otherwise); the parameters are broadcast from the group's rank 0 (as
    DistributedDataParallel does) and the FPTT state restarts from them (w_bar = w).
    Returns the module's FlatAllReduce."""
    from .optim import OPT_CODE

    what = f"{module.cell.title}(process_group=...)"
    _require_group(pg, what)
    kw = module._opt_kwargs
    clip = kw["clip"]
    fields = [("input_size", module.input_size), ("hidden_size", module.hidden_size),
              ("output_size", module.output_size), ("num_layers", module.num_layers),
              ("loss", code(module.loss)),
              ("per_step", module.per_step), ("optimizer", OPT_CODE[kw["optimizer"]]),
              ("lr", kw["lr"]), ("betas[0]", kw["betas"][0]), ("betas[1]", kw["betas"][1]),
              ("eps", kw["eps"]), ("weight_decay", kw["weight_decay"]),
              ("momentum", kw["momentum"]), ("dampening", kw["dampening"]),
              ("nesterov", bool(kw["nesterov"])), ("alpha", kw["alpha"]), ("beta", kw["beta"]),
              ("rho", kw["rho"]), ("c", kw["c"]), ("decoupled", bool(kw["decoupled"])),
              ("clip", 0.0 if clip is None else clip),
              ("nonfinite", code(kw["nonfinite"])), ("backend", code(module.backend)),
              ("allow_tf32", module.allow_tf32),
              ("device type", code(module._device().type))]
    agree(pg, fields, what, module._device())
    if module.backend not in SPLIT_BACKENDS:
        raise NotImplementedError(f"{what}: backend {module.backend!r} has no data-parallel "
                                  f"step (backends with one: {', '.join(SPLIT_BACKENDS)})")
    params = module.fptt_parameters()
    broadcast_(params, pg, module._device())
    module.optimizer = type(module.optimizer)(params, **kw)  # w_bar = w, lam = 0
    return FlatAllReduce(params, pg)


# -- the command line under torchrun -------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a torchrun job."""

    pg: object
    rank: int
    world: int
    local_rank: int
    backend: str
    owned: bool = True  # init_from_env created the process group (shutdown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, env) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer "
                         f"(torchrun sets it; see README, 'Scaling out')") from None


def env_world(env=None) -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when not set."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return 1
    world = _env_int("WORLD_SIZE", env)
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
    return world


def init_from_env(device_type: str, env=None) -> Dist | None:
    """The default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo for CPU runs, NCCL for CUDA runs (each
    process on GPU LOCAL_RANK). None when WORLD_SIZE is unset or 1 (one process)."""
    env = os.environ if env is None else env
    world = env_world(env)
    if world == 1:
        return None
    rank = _env_int("RANK", env)
    local_rank = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK={rank} is not in [0, WORLD_SIZE={world})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                         f"processes with torchrun (README, 'Scaling out')")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s): give torchrun "
                             f"--nproc-per-node at most the GPU count")
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=TIMEOUT)
    return Dist(dist.group.WORLD, rank, world, local_rank, dist.get_backend(), owned)


def shutdown(d: Dist | None) -> None:
    """Destroy the process group init_from_env created (not one the caller made)."""
    if d is not None and d.owned and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(batch: int, rank: int, world: int) -> tuple:
    """[lo, hi): rank's rows of a global batch of `batch` rows; the first batch % world
    ranks take one row more. Every rank needs at least one row."""
    if batch < world:
        raise ValueError(f"batch={batch} rows cannot be shared by {world} processes "
                         f"(each needs at least one row)")
    base, extra = divmod(batch, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def any_rank(flag: bool, pg) -> bool:
    """True on every rank if `flag` is True on any (one all_reduce of one number)."""
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(pg))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
    return bool(t.item() > 0)


def mean_over_rows(value: float, rows: int, pg) -> float:
    """The row-weighted mean of a per-rank mean (e.g. a loss) over the group."""
    t = torch.tensor([float(value) * rows, float(rows)], dtype=torch.float64,
                     device=_collective_device(pg))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
    return float(t[0] / t[1])


class ReducedStep:
    """An optimiser whose step() first all-reduces its parameters' gradients (one flat
    buffer, weighted by `rows`, the rows this rank trained on), then optionally clips their
    global norm (`clip`: BPTT's clipping, which must see the reduced gradient), then steps
    the wrapped optimiser. For the reference model under torchrun, whose segment loop
    (fptt_fast.reference) calls only zero_grad() and step()."""

    def __init__(self, opt, pg, clip: float | None = None):
        self.opt, self.pg, self.clip = opt, pg, clip
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.reducer = FlatAllReduce(self.params, pg)
        self.rows = None

    def zero_grad(self, set_to_none: bool = False):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        if self.rows is None:
            raise RuntimeError("ReducedStep.step: set .rows (this rank's batch rows) first")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        _, reduced = self.reducer.reduce(grads, 0.0, self.rows)
        for p, g in zip(self.params, reduced):
            p.grad = g
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
