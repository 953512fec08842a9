"""fptt_fast.FPTT: a model-agnostic FPTT optimiser (a real torch.optim.Optimizer).

Swap it in for torch.optim.Adam/SGD/AdamW: p.grad holds the task gradient of the
segment; step() adds the regulariser's gradient, clips globally, takes the base
optimiser step and updates the dual (lam) and the running average (w_bar), all in
one fused pass on the cpu/triton/cuda backends (docs/ALGORITHM.md, steps 2-6).
"""
from __future__ import annotations

import ctypes
import os

import torch

from . import backends, reference
from .layout import HYPER_FIELDS, OPT_CODE  # noqa: F401 (re-exported: the binary layout)
from .reference import NONFINITE, OPTIMIZERS, Hyper
from .seam import FpttState

MISSING_GRAD = ("skip", "zero")
# Parameter dtypes FPTT takes. The fused kernels compute in float32; float64 (a control
# run for rounding, say) runs on the reference backend, which keeps the parameters' dtype.
STATE_DTYPES = (torch.float32, torch.float64)


def _resolve_backend(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """backends.resolve for parameters of `dtype`: auto picks the reference backend for
    float64; a fused backend asked for float64 raises TypeError naming the alternative."""
    if dtype == torch.float32:
        return backends.resolve(requested, device_type)
    if requested not in ("auto", "reference"):
        raise TypeError(f"backend {requested!r} computes in float32; float64 parameters run on "
                        f"backend='reference' (or 'auto', which picks it)")
    return backends.resolve("reference", device_type)

try:  # torch's global step hooks (torch.optim.optimizer.register_optimizer_step_*_hook)
    from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
    from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS
except ImportError:  # a torch without them: a non-empty stand-in sends every step() through
    _GLOBAL_PRE_HOOKS = _GLOBAL_POST_HOOKS = {"unknown": None}  # torch's own wrapper
_profiler_enabled = torch._C._autograd._profiler_enabled

# status tensor written by every backend, on the parameters' device, never synced:
STATUS_NORM, STATUS_LAST_SKIPPED, STATUS_SKIPPED = 0, 1, 2
# What the cpu backend's C++ plan (_C.CpuUpdatePlan, csrc/bind_update.cpp) returns instead of
# the skipped-step count when it did not step: rebuild it; refresh the hyper table; take the
# list path (gradients it does not take: sparse, mis-shaped, non-contiguous).
PLAN_STALE, PLAN_HYPER, PLAN_FALLBACK = -1, -2, -3


class GraphCache(dict):
    """Captured CUDA graphs by key; copies and pickles empty (a graph holds addresses)."""

    def __reduce__(self):
        return (GraphCache, ())


def _hyper_row(group):
    return (float(group["lr"]), float(group["alpha"]), float(group["beta"]), float(group["rho"]),
            float(group["c"]), float(group["weight_decay"]), float(group["betas"][0]),
            float(group["betas"][1]), float(group["eps"]), float(group["momentum"]),
            float(group["dampening"]), float(bool(group["nesterov"])),
            float(bool(group["decoupled"])))


# Group keys added after state dicts were first saved, with the value that reproduces what
# such a state dict meant: loading one without them takes these.
_ADDED_GROUP_KEYS = {"decoupled": False}


class FPTT(torch.optim.Optimizer):
    """FPTT (Kag & Saligrama, ICML 2021) around SGD, Adam or AdamW.

    Args:
        params: parameters or parameter groups (fp32, contiguous, one device).
        lr, betas, eps, weight_decay: as torch.optim.Adam/AdamW; lr, momentum,
            dampening, nesterov, weight_decay: as torch.optim.SGD.
        optimizer: "sgd", "adam" or "adamw" (the base optimiser, step 4).
        alpha, beta, rho, c: FPTT's hyper-parameters (per group, docs/ALGORITHM.md).
            alpha=0 turns the regulariser off: the base optimiser on the clipped task
            gradient, w_bar and lam kept as they are.
        decoupled: per group. False (default): the regulariser's gradient joins the task
            gradient before the clip and the base optimiser (the paper's FPTT). True: the
            clip and the base optimiser see the task gradient alone, and w then moves by
            -lr times the regulariser's gradient (as AdamW decouples weight decay).
        clip: max global L2 norm of the gradient the base optimiser takes; None/0: no
            clipping.
        missing_grad: "skip" (torch's rule): a parameter whose .grad is None is left alone.
            "zero": it takes a zero task gradient (a zeroed buffer is attached as its
            .grad), so the regulariser, the clip norm and its step count cover it, as in
            code that adds the regulariser to the loss.
        nonfinite: "raise" (FloatingPointError; on CUDA at the next step() after the
            GPU finished, or at check_finite()) or "skip" (the step changes nothing
            and is counted in skipped_steps). Either way a gradient holding inf/NaN
            never changes w, w_bar, lam or the optimiser state.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (fptt_fast.backends).
        graph: cuda/triton backends: step() replays a CUDA graph of the fused update,
            captured at the first step per set of tensor addresses (parameters,
            gradients, state; keep gradient buffers, e.g. zero_grad(set_to_none=False)),
            after one eager step. Hyper-parameter changes are honoured (the table is
            refreshed in place); a clip change captures anew. ValueError elsewhere.

    State per parameter, readable as opt.state[p][name]: w_bar, lam, step, and
    exp_avg/exp_avg_sq (Adam, AdamW) or momentum_buffer (SGD). They are views into
    flat contiguous buffers (opt.flat_state) that the fused kernels walk: write into them
    (copy_, load_state_dict), do not rebind them (opt.state[p]["lam"] = t is not seen by
    the cpu backend's cached plan, nor by the GPU backends' cached tables).
    Parameters whose .grad is None are left alone by step(), as torch does.

    On the cpu backend step() is one C++ call (_C.CpuUpdatePlan, built at the first step
    and rebuilt when the groups, clip or a parameter's tensor change; hyper-parameter
    changes such as an lr scheduler's refresh its table in place). Step hooks and the
    profiler's record_function run as torch's Optimizer runs them, when any is registered
    or the profiler is on.
    """

    def __init__(self, params, lr=1e-3, *, optimizer="adam", betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, alpha=0.5,
                 beta=0.5, rho=0.0, c=1.0, decoupled=False, clip=None, nonfinite="raise",
                 missing_grad="skip", backend="auto", graph=False):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if missing_grad not in MISSING_GRAD:
            raise ValueError(f"missing_grad must be one of {MISSING_GRAD}, got {missing_grad!r}")
        self.missing_grad = missing_grad
        self._zero_grads = {}  # missing_grad="zero": a zero gradient buffer per parameter
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.base = optimizer
        self.clip = reference.validate_clip(clip)
        self.nonfinite = nonfinite
        self._requested_backend = backend
        self.flat_state = None
        defaults = dict(lr=lr, alpha=alpha, beta=beta, rho=rho, c=c, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, decoupled=decoupled)
        super().__init__(params, defaults)
        self._hyper_key, self._hyper = None, None
        self._plan = None  # cpu backend: the C++ step plan, built at the first step
        self._pending = None  # (event, pinned skipped count) of a CUDA step not yet checked
        self._seen_skipped = 0  # skipped steps already reported
        self._count_host = None  # (event, pinned float) for the non-blocking look
        self._status_host = None  # FPTT_FAST_STATUS=mapped: the status's host view ...
        self._skip_word = None    # ... and its skipped count as a ctypes float (_new_status)
        self._build_state()
        if not isinstance(graph, bool):
            raise ValueError(f"graph must be True or False, got {graph!r}")
        if graph and (not self._engine.device_launch or self._status.device.type != "cuda"):
            raise ValueError(f"graph=True needs the cuda or triton backend on CUDA tensors, "
                             f"this optimiser runs {self.backend!r} on "
                             f"{self._status.device.type} tensors")
        self.graph = graph
        self._graphs = GraphCache()  # captured steps, by _graph_key
        self._graph_captures = 0

    # -- construction --------------------------------------------------------
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # the optimiser stays as it was
            raise
        if self.flat_state is not None:  # a group added after construction
            self._build_state()

    def _check_group(self, group):
        """A new group's hyper-parameters and parameters, checked against the others."""
        reference.validate_hyper(group, self.base)
        group["betas"] = tuple(group["betas"])
        for p in group["params"]:
            if p.dtype not in STATE_DTYPES:
                raise TypeError(
                    f"FPTT takes float32 or float64 parameters, got {p.dtype} (shape "
                    f"{tuple(p.shape)}): train float32 parameters (torch.autocast runs the model "
                    f"in {str(p.dtype).replace('torch.', '')}) or keep a float32 master copy")
            if not p.is_contiguous():
                raise ValueError(f"FPTT needs contiguous parameters; got one of shape {tuple(p.shape)} "
                                 f"with strides {p.stride()}")
            if p.is_sparse:
                raise ValueError("FPTT does not support sparse parameters")
        others = [q for g in self.param_groups[:-1] for q in g["params"]]
        mine = group["params"]
        if others and mine and mine[0].dtype != others[0].dtype:
            raise TypeError(f"FPTT keeps one flat state per slot: all parameters of one dtype, got "
                            f"a group of {mine[0].dtype} for parameters of {others[0].dtype}")
        if others and mine and mine[0].device != others[0].device:
            raise ValueError(f"FPTT needs all parameters on one device, got a group on "
                             f"{mine[0].device} for parameters on {others[0].device}")

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _build_state(self, mapped_status=None):
        """(Re)allocate the flat state buffers, keeping any values already held (and the
        status's; mapped_status: _new_status's `mapped`, by default the kind this
        optimiser's status already is, else FPTT_FAST_STATUS)."""
        if mapped_status is None and getattr(self, "_status", None) is not None:
            mapped_status = self._status_host is not None
        params = self._params()
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"FPTT needs all parameters on one device, got {sorted(map(str, devices))}")
        device = params[0].device if params else torch.device("cpu")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(f"FPTT keeps one flat state per slot: all parameters of one dtype, got "
                            f"{', '.join(sorted(map(str, dtypes)))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        self.backend = _resolve_backend(self._requested_backend, device.type, dtype)
        self._engine = backends.engine(self.backend)  # the backend object (backends/base.py)
        names = ("w_bar", "lam") + (("momentum_buffer",) if self.base == "sgd" else ("exp_avg", "exp_avg_sq"))
        total = sum(p.numel() for p in params)
        flat = {n: torch.zeros(total, device=device, dtype=dtype) for n in names}
        flat["step"] = torch.zeros(len(params), device=device)  # counts, float32 as the kernels read them
        offset = 0
        for i, p in enumerate(params):
            old = self.state.get(p, {})
            st = {n: flat[n][offset:offset + p.numel()].view_as(p) for n in names}
            st["step"] = flat["step"][i]
            st["w_bar"].copy_(p.detach())
            for n, t in st.items():
                if n in old:
                    t.copy_(old[n])
            self.state[p] = st
            offset += p.numel()
        self.flat_state = flat
        self._drop_plan()  # it holds the old buffers
        old = getattr(self, "_status", None)
        if old is not None and self._status_host is not None:
            old = self._status_values()  # (a mapped status is read through its host view)
        self._status, self._status_host, self._skip_word = self._new_status(device, mapped_status)
        if old is not None:  # a group added later keeps the counts
            self._write_status(old)

    def _new_status(self, device, mapped=None):
        """The status [norm, last skipped, skipped count] the kernels write: (tensor, host
        view, ctypes float of the count). The host view is not None only with the
        environment variable FPTT_FAST_STATUS=mapped (or mapped=True) on a CUDA device and
        the cuda or triton backend: the status then lives in mapped pinned host memory, and
        nonfinite='raise' reads the count with one host load instead of queueing an event
        and a copy per step (NOT YET RUN ON A GPU, so not the default)."""
        if mapped is None:
            mapped = os.environ.get("FPTT_FAST_STATUS") == "mapped"
        if not mapped or device.type != "cuda" or not self._engine.device_launch:
            return torch.zeros(3, device=device), None, None
        ext = backends.extension()
        if not hasattr(ext, "mapped_status_cuda"):
            raise RuntimeError("FPTT_FAST_STATUS=mapped needs fptt_fast._C built with its CUDA "
                               "kernels (this build has none)")
        dev_view, host_view = ext.mapped_status_cuda(device.index)
        word = ctypes.c_float.from_address(host_view.data_ptr() + 4 * STATUS_SKIPPED)
        return dev_view, host_view, word

    def _status_values(self):
        """The status as a CPU tensor (syncs a CUDA device). A mapped status is read through
        its host view: a torch copy from its device view would be a device-to-host memcpy
        whose source is host memory, which the CUDA docs leave undefined."""
        if self._status_host is None:
            return self._status.detach().to("cpu", copy=True)
        torch.cuda.synchronize(self._status.device)
        return self._status_host.clone()

    def _write_status(self, values):
        """Overwrite the status with `values` (3 numbers); a mapped one through its host view,
        once the device is idle (a running kernel may be writing it)."""
        values = torch.as_tensor(values, dtype=torch.float32)
        if self._status_host is None:
            self._status.copy_(values)
            return
        values = values.cpu()
        torch.cuda.synchronize(self._status.device)
        self._status_host.copy_(values)

    # -- the fused-kernel interface ----------------------------------------------------
    # What a kernel that runs this optimiser's update inside its own launch (FPTTLSTM,
    # fptt_fast.distributed) uses, and nothing else of FPTT's: kernel_state (the tensors
    # and codes), device_step_begin / device_step_end around a device launch,
    # report_skipped after a host-run (cpu) step, and on the cpu backend cpu_plan /
    # refresh_cpu_plan (the C++ update plan a CpuLstmPlan is built on).
    def kernel_state(self, params, grads, device) -> FpttState:
        """The optimiser's side of a fused LSTM segment launch over `params` (each in one
        group of this optimiser, which owns their state) with gradient buffers `grads`: the
        typed state FPTTLSTM and fptt_fast.distributed hand the kernels instead of reading
        FPTT's state dicts themselves. The hyper-parameter table is refreshed (validated)
        for `device` first."""
        sts = [self.state[p] for p in params]
        group_index = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        return self._state_of([p.detach() for p in params], list(grads), sts,
                              [group_index[id(p)] for p in params], self._hyper_table(device))

    def _state_of(self, params, grads, sts, group_of, hyper) -> FpttState:
        """FpttState over these parameters (and their state dicts `sts`)."""
        first = "momentum_buffer" if self.base == "sgd" else "exp_avg"
        second = "momentum_buffer" if self.base == "sgd" else "exp_avg_sq"
        return FpttState(
            params=params, grads=grads, w_bar=[s["w_bar"] for s in sts],
            lam=[s["lam"] for s in sts], exp_avg=[s[first] for s in sts],
            exp_avg_sq=[s[second] for s in sts], step=[s["step"].view(1) for s in sts],
            hyper=hyper, group_of=group_of, optimizer=OPT_CODE[self.base],
            clip=float(self.clip or 0.0), status=self._status)

    def _hyper_table(self, device):
        """The per-group hyper-parameter rows on the device, validated when they change
        (e.g. by an lr scheduler). Refreshed in place with a non-blocking copy, so the
        tensor keeps its address (kernel tables stay valid) and step() never syncs."""
        key = tuple(_hyper_row(g) for g in self.param_groups)
        if key != self._hyper_key:
            for g in self.param_groups:
                reference.validate_hyper(g, self.base)
            host = torch.tensor(key, dtype=torch.float32)
            if device.type == "cuda":
                host = host.pin_memory()
            if self._hyper is None or self._hyper.shape != host.shape or self._hyper.device != device:
                self._hyper = torch.empty(host.shape, device=device)
                self._drop_plan()  # it holds the old table
            self._hyper.copy_(host, non_blocking=True)
            self._hyper_key = key
        return self._hyper

    def _gather(self):
        """(parameter objects, their state dicts, FpttState) over the parameters that have
        a gradient (hyper left None: the caller fills it)."""
        objs, params, grads, sts, group_of = [], [], [], [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise ValueError("FPTT does not support sparse gradients")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"gradient of a parameter of shape {tuple(p.shape)} has shape "
                                     f"{tuple(g.shape)}, dtype {g.dtype}, device {g.device}")
                objs.append(p)
                params.append(p.detach())
                grads.append(g if g.is_contiguous() else g.contiguous())
                sts.append(self.state[p])
                group_of.append(gi)
        return objs, sts, self._state_of(params, grads, sts, group_of, None)

    def step(self, closure=None):
        """docs/ALGORITHM.md steps 2-6 for every parameter with a gradient."""
        # The hot path (cpu backend, plan built, no closure, no hooks, no profiler): one C++
        # call. torch wraps every Optimizer subclass's step() in a profiler record_function
        # and two hook loops, ~10 us on a 2-core VM: more than this whole step for a small
        # model. FPTT.step is marked as already wrapped (below the class), and everything
        # else goes through that same torch wrapper (_hooked_step).
        if self.missing_grad == "zero":
            self._attach_zero_grads()
        plan = self._plan
        if (plan is not None and closure is None and not self._optimizer_step_pre_hooks
                and not self._optimizer_step_post_hooks and not _GLOBAL_PRE_HOOKS
                and not _GLOBAL_POST_HOOKS and not _profiler_enabled()):
            count = plan.step(self.param_groups, self.clip)
            if count >= 0:
                if count != self._seen_skipped:
                    self.report_skipped(count)
                return None
        return _hooked_step(self) if closure is None else _hooked_step(self, closure)

    def _attach_zero_grads(self):
        """missing_grad="zero": a parameter without .grad gets its own zeroed buffer (the
        same tensor every time, so cached launch tables stay valid)."""
        for p in self._params():
            if p.grad is None:
                buf = self._zero_grads.get(p)
                if buf is None:
                    buf = self._zero_grads[p] = torch.zeros_like(p)
                else:
                    buf.zero_()  # a backward may have accumulated into it since
                p.grad = buf

    @torch.no_grad()
    def _step(self, closure=None):
        """step() in full: the closure, then the backend's update (cpu: through the plan,
        building or refreshing it as needed; gradients it leaves to the list path and the
        other backends: the lists gathered here)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.device_step_begin()
        engine = self._engine
        if engine.cpu_plan:
            count = self._plan_step()
            if count is not None:
                if count != self._seen_skipped:
                    self.report_skipped(count)
                return loss
        objs, sts, state = self._gather()
        if not objs:
            return loss
        state.hyper = self._hyper_table(objs[0].device)  # validates changed hyper-parameters
        if not engine.device_launch:  # reference, and the cpu backend's list path
            engine.update(self, sts, state)
            return loss
        launch = engine.update_launcher(state)
        # graph mode replays a captured step; gradients copied by _gather (non-contiguous)
        # have new addresses every step: those steps run eagerly
        if (self.graph and self._graph_captures < self.MAX_GRAPH_CAPTURES
                and all(p.grad is g for p, g in zip(objs, state.grads))):
            self._graph_step(launch, state)
        else:
            launch()
        self.device_step_end()
        return loss

    # -- CUDA graphs (graph=True; cuda and triton backends) --------------------------------
    # Captures per optimiser before graph mode gives up and steps eagerly: gradients
    # re-allocated every step (zero_grad(set_to_none=True) with a caching allocator that
    # hands out other blocks) would otherwise capture, and keep, a graph per step.
    MAX_GRAPH_CAPTURES = 16
    MAX_GRAPHS = 4  # kept per optimiser, least recently used dropped

    def _graph_key(self, state):
        """What a captured step bakes in: the address of every tensor it reads or writes
        (parameters, gradients, FPTT state, hyper table, status), which parameters step and
        in which group, and the kernel arguments not read from memory (clip, optimiser).
        Not the hyper-parameter values: the kernels read those from the table, which
        _hyper_table refreshes in place before each step."""
        return (tuple(t.data_ptr() for t in state.params),
                tuple(g.data_ptr() for g in state.grads), tuple(state.group_of), state.clip,
                self.base, state.hyper.data_ptr(), self._status.data_ptr(),
                tuple(t.data_ptr() for t in self.flat_state.values()))

    def _graph_step(self, launch, state):
        """The step from a CUDA graph: the first step per key runs eagerly (its real work,
        and the warm-up the glue needs: its slot tables are built outside a capture), then
        the same launch is captured on a side stream (capture runs nothing); later steps
        with that key replay it. Bitwise the eager step: same kernels, arguments, memory."""
        key = self._graph_key(state)
        entry = self._graphs.pop(key, None)
        if entry is None:
            launch()
            dev = state.params[0].device
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side), torch.cuda.graph(g, stream=side):
                held = launch()
            torch.cuda.current_stream(dev).wait_stream(side)
            entry = (g, held)
            self._graph_captures += 1
            while len(self._graphs) >= self.MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
        else:
            entry[0].replay()
        self._graphs[key] = entry  # most recently used last

    # -- the cpu backend's plan ------------------------------------------------------
    def _plan_step(self):
        """One step through the C++ plan, built or refreshed first where it says so.
        Returns the skipped-step count, or None: gradients the plan leaves to the list path
        (sparse, of another shape/dtype/device: ValueError there; non-contiguous: copied)."""
        for _ in range(3):
            plan = self._plan
            if plan is None:
                # as the list path: no gradient, no step (and no validation)
                if all(p.grad is None for p in self._params()):
                    return int(self._status[STATUS_SKIPPED].item())
                code = PLAN_STALE
            else:
                code = plan.step(self.param_groups, self.clip)
            if code >= 0:
                return code
            if code == PLAN_FALLBACK:
                return None
            self.refresh_cpu_plan(code)
        raise RuntimeError("FPTT: the cpu step plan is still stale after a rebuild (a bug)")

    def _drop_plan(self):
        """Forget the cpu plan, retired first (cpu_plan)."""
        if self._plan is not None:
            self._plan.retire()
        self._plan = None

    def cpu_plan(self):
        """The C++ update plan of the cpu backend (_C.CpuUpdatePlan), built if there is
        none. A plan this optimiser drops is retired first (its checks then say PLAN_STALE),
        so whatever was built on it (FPTTLSTM's CpuLstmPlan) knows to rebuild."""
        if self._plan is None:
            self.refresh_cpu_plan(PLAN_STALE)
        return self._plan

    def refresh_cpu_plan(self, code):
        """Act on a plan's code: PLAN_STALE, build a new plan (the hyper-parameters are
        validated here, the clip and every tensor by the shared checks in C++); PLAN_HYPER,
        validate the groups' hyper-parameters, refresh the table in place and let the plan
        take them."""
        if code == PLAN_HYPER and self._plan is not None:
            self._hyper_table(self._hyper.device)  # raises ValueError naming a bad field
            if self._plan is not None:  # (the table kept its place)
                self._plan.accept_hyper(self.param_groups)
                return
        self._drop_plan()
        params = self._params()
        hyper = self._hyper_table(params[0].device if params else torch.device("cpu"))
        # the plan takes the parameters and their groups from param_groups
        state = self._state_of([], [], [self.state[p] for p in params], [], hyper)
        self._plan = self._engine.update_plan(self.param_groups, state)

    def _record(self, norm, skipped):
        """Host-side status of a step whose result the host already knows."""
        self._status[STATUS_NORM] = norm
        self._status[STATUS_LAST_SKIPPED] = float(skipped)
        if skipped:
            self._status[STATUS_SKIPPED] += 1
        self.report_skipped(int(self._status[STATUS_SKIPPED].item()))

    def device_step_end(self):
        """After launching a step on the device (the fused update, or an FPTTLSTM launch
        that updates this optimiser's parameters): queue a non-blocking look at the
        skipped-step count (nonfinite='raise').
        The count is cumulative, so the newest snapshot covers every earlier step even
        when the host runs several steps ahead of the GPU."""
        if self.nonfinite != "raise" or self._skip_word is not None:
            return  # (a mapped status: device_step_begin reads the count itself)
        if self._status.device.type == "cpu":  # the interpreter: the result is here already
            self.report_skipped(int(self._status[STATUS_SKIPPED].item()))
            return
        if torch.cuda.is_current_stream_capturing():
            return
        if self._count_host is None:  # one pinned slot and one event, reused every step
            self._count_host = (torch.cuda.Event(), torch.empty(1, pin_memory=True))
        ev, count = self._count_host
        count.copy_(self._status[STATUS_SKIPPED:STATUS_SKIPPED + 1], non_blocking=True)
        ev.record()
        self._pending = (ev, count)

    def device_step_begin(self):
        """Before launching a step on the device: raise for steps skipped by earlier device
        steps that have finished by now (nonfinite='raise'; never waits)."""
        self._raise_pending()

    def _raise_pending(self, wait=False):
        if self._skip_word is not None:  # mapped: the count as far as the device has got
            if wait:
                torch.cuda.synchronize(self._status.device)
            count = int(self._skip_word.value)
            if count != self._seen_skipped:
                self.report_skipped(count)
            return
        if self._pending is None:
            return
        ev, count = self._pending
        if wait:
            ev.synchronize()
        elif not ev.query():
            return
        self._pending = None
        self.report_skipped(int(count.item()))

    def report_skipped(self, count):
        """Take the cumulative skipped-step count `count` (from a cpu kernel's return, or
        the status read back after device steps): raise FloatingPointError
        (nonfinite='raise') if steps were skipped since the last report."""
        new = count - self._seen_skipped
        self._seen_skipped = count
        if new > 0 and self.nonfinite == "raise":
            raise FloatingPointError(
                f"FPTT step on {self.backend}: in {new} step(s) the gradient or the regulariser's "
                "state (w_bar, lam) held inf or NaN; they updated nothing. Use nonfinite='skip' to "
                "skip such steps silently.")

    def check_finite(self):
        """Wait for the last step and raise if its gradient was not finite ('raise')."""
        self._raise_pending(wait=True)

    # -- status -------------------------------------------------------------------
    @property
    def last_norm(self):
        """Global norm of the last step's regularised gradient (a tensor; no sync). With a
        mapped status (FPTT_FAST_STATUS=mapped) a CPU tensor, read after a device sync."""
        if self._status_host is not None:
            return self._status_values()[STATUS_NORM]
        return self._status[STATUS_NORM]

    @property
    def skipped_steps(self) -> int:
        """Steps that changed nothing because the gradient was not finite (syncs)."""
        return int(self._status_values()[STATUS_SKIPPED].item())

    # -- FPTT extras --------------------------------------------------------------
    @torch.no_grad()
    def reset(self, lam=True):
        """End of epoch: w <- w_bar for every parameter and, with lam=True, lam <- 0 (the
        authors' MNIST loop; their PTB loops keep lam: lam=False). Groups with alpha == 0
        are left alone: the regulariser off keeps no average."""
        pairs = [(p, Hyper.from_group(g)) for g in self.param_groups for p in g["params"]]
        reference.reset_([p for p, _ in pairs], [self.state[p] for p, _ in pairs],
                         [h for _, h in pairs], lam=bool(lam))

    @torch.no_grad()
    def regularizer(self):
        """sum[(rho-1)*lam*w + (c*alpha/2)*(w - w_bar)^2] over all parameters (a tensor)."""
        total = None
        for group in self.param_groups:
            h = Hyper.from_group(group)
            for p in group["params"]:
                st = self.state[p]
                r = reference.regularizer_value(p, st["w_bar"], st["lam"], h)
                total = r if total is None else total + r
        return total if total is not None else torch.zeros(())

    # -- copies and pickles ---------------------------------------------------------
    # torch's Optimizer pickles (and so deep-copies) only defaults, state and param_groups,
    # which left a copy of an FPTT (or of an FPTTLSTM) without its flat buffers and status:
    # it failed at its first step. Everything is kept but what holds raw addresses or
    # device handles: the C++ plan and captured graphs (their own __reduce__ give empty
    # ones), the pending event and its pinned slot, a mapped status's host views (its
    # values are carried), and the flat buffers: the copy builds its own from the per-
    # parameter state, so its state entries are views of them again (plain pickle copies
    # each view on its own).
    _TRANSIENT = ("flat_state", "_pending", "_count_host", "_status_host", "_skip_word",
                  "_zero_grads")

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in self._TRANSIENT:
            d[k] = None
        d["_status_mapped"] = self._status_host is not None
        if self._status_host is not None:
            d["_status"] = self._status_values()  # a new mapped status gets these values
        return d

    def __setstate__(self, state):
        state = dict(state)
        mapped = state.pop("_status_mapped", False)
        state["_zero_grads"] = {}  # buffers of the copy's own parameters, made when needed
        state.setdefault("missing_grad", "skip")
        for group in state.get("param_groups", ()):  # pickled before these keys existed
            for k, v in _ADDED_GROUP_KEYS.items():
                group.setdefault(k, v)
        super().__setstate__(state)
        self._build_state(mapped_status=mapped)

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self):
        """torch's layout (state keyed by parameter index), tensors copied, plus 'fptt'."""
        sd = super().state_dict()
        sd["state"] = {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}
        sd["fptt"] = {"optimizer": self.base, "clip": self.clip, "nonfinite": self.nonfinite,
                      "status": self._status.clone() if self._status_host is None
                      else self._status_values().to(self._status.device)}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Load into the existing flat buffers. Everything is checked first: a missing or
        mis-shaped field raises ValueError naming it and changes nothing."""
        self._check_state_dict(state_dict)
        params = self._params()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            saved = {**_ADDED_GROUP_KEYS, **saved}
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if k == "betas" else v
        for i, p in enumerate(params):
            for n, t in self.state[p].items():
                t.copy_(torch.as_tensor(state_dict["state"][i][n]).reshape(t.shape))
        self._write_status(state_dict["fptt"]["status"])
        self.clip = reference.validate_clip(state_dict["fptt"]["clip"])
        self.nonfinite = state_dict["fptt"]["nonfinite"]
        self._hyper_key = None
        self._drop_plan()  # rebuilt (and the loaded hyper-parameters validated) at the next step
        self._pending = None  # a report pending from before the load no longer applies
        self._seen_skipped = int(self._status_values()[STATUS_SKIPPED].item())

    # torch.optim group keys that mean the same here, per base optimiser
    _TORCH_GROUP_KEYS = {"sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay"),
                         "adam": ("lr", "betas", "eps", "weight_decay"),
                         "adamw": ("lr", "betas", "eps", "weight_decay")}
    _TORCH_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
                    "adamw": ("exp_avg", "exp_avg_sq")}

    @torch.no_grad()
    def load_torch_state_dict(self, state_dict):
        """Take over a torch.optim.SGD / Adam / AdamW state_dict (the base optimiser this
        FPTT wraps, same parameters and groups in the same order): its step counts,
        moments or momentum buffers and its groups' hyper-parameters; W̄ starts at the
        current w and λ at 0, as for a new FPTT. Checked first: a mismatch raises
        ValueError naming it and changes nothing. (amsgrad, maximize, capturable and
        differentiable runs are refused: FPTT has no such mode.)"""
        if not isinstance(state_dict, dict) or "fptt" in state_dict or \
                not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("load_torch_state_dict takes a torch.optim optimiser's state_dict "
                             "(keys 'state' and 'param_groups'); an FPTT state_dict goes to "
                             "load_state_dict")
        groups, states = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(groups)} parameter groups, this optimiser "
                             f"{len(self.param_groups)}")
        keys, slots = self._TORCH_GROUP_KEYS[self.base], self._TORCH_SLOTS[self.base]
        new_values = []
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(f"group {gi}: {len(theirs.get('params', ()))} parameters in the "
                                 f"state_dict, {len(mine['params'])} here")
            for k in keys:
                if k not in theirs:
                    raise ValueError(f"group {gi} misses {k!r}: not a torch.optim."
                                     f"{ {'sgd': 'SGD', 'adam': 'Adam', 'adamw': 'AdamW'}[self.base]} "
                                     f"state_dict")
            for k in ("amsgrad", "maximize", "capturable", "differentiable"):
                if theirs.get(k):
                    raise ValueError(f"group {gi}: {k}=True has no FPTT equivalent")
            # torch allows a tensor lr; FPTT's hyper table takes plain numbers
            values = {k: tuple(float(b) for b in theirs[k]) if k == "betas" else
                      (float(theirs[k]) if torch.is_tensor(theirs[k]) else theirs[k]) for k in keys}
            try:
                reference.validate_hyper({**mine, **values}, self.base)
            except ValueError as e:
                raise ValueError(f"group {gi}: {e}") from None
            new_values.append(values)
        for i, p in enumerate(self._params()):
            st = states.get(i, {})
            for n in slots:
                t = st.get(n)
                if t is not None and tuple(torch.as_tensor(t).shape) != tuple(p.shape):
                    raise ValueError(f"parameter {i}: {n} has shape "
                                     f"{tuple(torch.as_tensor(t).shape)}, the parameter {tuple(p.shape)}")
            if st and self.base != "sgd" and not all(n in st for n in ("step",) + slots):
                raise ValueError(f"parameter {i}: its state misses one of step, {', '.join(slots)}")
        for mine, values in zip(self.param_groups, new_values):
            mine.update(values)
        for i, p in enumerate(self._params()):
            st, mine = states.get(i, {}), self.state[p]
            mine["w_bar"].copy_(p)
            mine["lam"].zero_()
            for n in slots:
                t = st.get(n)
                mine[n].copy_(torch.as_tensor(t)) if t is not None else mine[n].zero_()
            # torch's SGD keeps no count: a buffer means a step was taken (ours counts
            # steps only to know whether the buffer is initialised)
            step = float(st["step"]) if "step" in st else float(st.get("momentum_buffer") is not None)
            mine["step"].fill_(step)
        self._hyper_key = None
        self._drop_plan()

    def _check_state_dict(self, sd):
        if not isinstance(sd, dict):
            raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
        for key in ("state", "param_groups", "fptt"):
            if key not in sd:
                raise ValueError(f"state_dict misses {key!r}")
            if not isinstance(sd[key], (dict, list)):
                raise ValueError(f"state_dict[{key!r}] must be a dict or list, got {type(sd[key]).__name__}")
        if not isinstance(sd["fptt"], dict):
            raise ValueError("state_dict['fptt'] must be a dict")
        if sd["fptt"].get("optimizer") != self.base:
            raise ValueError(f"state_dict['fptt']['optimizer'] is {sd['fptt'].get('optimizer')!r}, "
                             f"this optimiser uses {self.base!r}")
        if tuple(torch.as_tensor(sd["fptt"].get("status", torch.zeros(0))).shape) != (3,):
            raise ValueError("state_dict['fptt']['status'] must have shape (3,)")
        reference.validate_clip(sd["fptt"].get("clip"))
        if sd["fptt"].get("nonfinite") not in NONFINITE:
            raise ValueError(f"state_dict['fptt']['nonfinite'] must be one of {NONFINITE}")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] has {len(groups)} groups, expected "
                             f"{len(self.param_groups)}")
        for gi, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError(f"state_dict['param_groups'][{gi}]['params'] has "
                                 f"{len(saved.get('params', ()))} parameters, expected {len(mine['params'])}")
            for k in mine:
                if k != "params" and k not in saved and k not in _ADDED_GROUP_KEYS:
                    raise ValueError(f"state_dict['param_groups'][{gi}] misses {k!r}")
            reference.validate_hyper(saved, self.base)
        for i, p in enumerate(self._params()):
            saved = sd["state"].get(i)
            if saved is None:
                raise ValueError(f"state_dict['state'] misses parameter {i}")
            for n, t in self.state[p].items():
                if n not in saved:
                    raise ValueError(f"state_dict['state'][{i}] misses {n!r}")
                if torch.as_tensor(saved[n]).numel() != t.numel() or (
                        t.dim() and tuple(torch.as_tensor(saved[n]).shape) != tuple(t.shape)):
                    raise ValueError(f"state_dict['state'][{i}][{n!r}] has shape "
                                     f"{tuple(torch.as_tensor(saved[n]).shape)}, expected {tuple(t.shape)}")


# torch.optim.Optimizer wraps a subclass's step() in its profiling/hook wrapper unless the
# function says it is wrapped already. FPTT.step takes the hot path itself when there is no
# hook and no profiler, and otherwise calls _hooked_step: FPTT._step inside that same torch
# wrapper (hooks, record_function "Optimizer.step#FPTT.step", _optimizer_step_code).
FPTT.step.hooked = True
_hooked_step = torch.optim.Optimizer.profile_hook_step(FPTT._step)
