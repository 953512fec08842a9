"""The argument checks of every compute binding of fptt_fast._C: bad arguments raise a
Python exception naming the argument, never crash the process, and change nothing.

Targets of the fuzz (TARGETS):
  fused_update_cpu, lstm_segment_step_cpu      the CPU bindings themselves
  fused_update_cuda_checks,                    the CUDA bindings' checks through the test-only
  lstm_segment_cuda_checks                     bindings (tests/seam_checks.py, device "cpu"):
                                               the same C++ check code the CUDA glue runs,
                                               with CPU tensors standing in for CUDA ones
                                               (the glue is not built on CPU CI)
  fused_update_cuda_refuses_cpu,               the same checks with device_type="cuda" fed
  lstm_segment_cuda_refuses_cpu                CPU tensors (the input of the former segfault
                                               of test_update_cuda.py::test_status_checks)
  fused_update_cuda, lstm_segment_step_cuda    the CUDA bindings themselves (GPU only)

Each case starts from a valid call built the way fptt_fast builds it (FPTT._gather,
FPTT.kernel_state), held as a flat dict of the fields of fptt_fast.seam's FpttState,
SegmentIO and SegmentConfig, then applies 1 to 3 mutations, each of which alone makes the
call invalid: wrong device type, dtype, layout, non-contiguous, wrong shape or size, wrong
list length, None or a wrong Python type, an output sharing memory with another argument
(a gradient buffer that is the parameter, h_out inside x, ...), out-of-range codes and
group indices, non-finite scalars, and for the CUDA LSTM tf32 and H > kLstmMaxHidden.
The case list is a function of SEED only (random.Random per case; torch seeded per case).

Crash isolation: the cases run in a subprocess (this file run as a script; all targets in
one process, to pay torch's start-up once), which logs a line before and after every case;
a crash (a signal, or any non-zero exit) fails that target's test, naming the case that was
running, and a fresh subprocess goes on with the remaining targets. In the worker every case must raise
RuntimeError, TypeError or ValueError, a RuntimeError must name a mutated argument, and
every tensor of the valid call (parameters, gradients, optimiser state, inputs, outputs,
workspace) must be bitwise unchanged, size included.
"""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

import fptt_fast
from fptt_fast import backends

if __package__ in (None, ""):  # run as the fuzz worker: python tests/test_bindings.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.seam_checks import check_ext, twins  # noqa: E402
from fptt_fast.lstm import LOSS_CODE
from fptt_fast.optim import HYPER_FIELDS, OPT_CODE
from fptt_fast.seam import FpttState

SEED = 20261126
N_CASES = 240  # per target: at least 200 cases each
HAS_CUDA = torch.cuda.is_available()

STATE_LISTS = ("w_bar", "lam", "exp_avg", "exp_avg_sq", "step")

# name: (family, flavour of the arguments, device of the tensors, device_type given to a
# test-only check binding or None for the real binding)
TARGETS = {
    "fused_update_cpu": ("update", "cpu", "cpu", None),
    "fused_update_cuda_checks": ("update", "cuda", "cpu", "cpu"),
    "fused_update_cuda_refuses_cpu": ("update", "cuda", "cpu", "cuda"),
    "fused_update_cuda": ("update", "cuda", "cuda", None),
    "lstm_segment_step_cpu": ("lstm", "cpu", "cpu", None),
    "lstm_segment_cuda_checks": ("lstm", "cuda", "cpu", "cpu"),
    "lstm_segment_cuda_refuses_cpu": ("lstm", "cuda", "cpu", "cuda"),
    "lstm_segment_step_cuda": ("lstm", "cuda", "cuda", None),
}
GPU_TARGETS = {"fused_update_cuda", "lstm_segment_step_cuda"}
EXPECTED_ERRORS = (RuntimeError, TypeError, ValueError)


def ext():
    return backends.extension()


# ---- valid calls -------------------------------------------------------------------------
class Case:
    """One call: args (by binding argument name), what the binding uses and writes, the
    tensors to snapshot, and the mutations applied."""

    def __init__(self, target, rng):
        self.target = target
        self.family, self.flavour, self.dev, self.devtype = TARGETS[target]
        self.rng = rng
        self.args = {}
        self.used = []        # (key, index or None) of every tensor the binding checks
        self.written = set()  # those it writes
        self.allowed = set()  # frozenset pairs that may share memory
        self.lists = []       # list arguments whose length is checked
        self.ints = []        # int arguments with a valid range ("optimizer", "loss", "group_of")
        self.floats = []      # float arguments that must be finite ("clip", "weight")
        self.keep = []        # tensors that must not change
        self.muts = []        # descriptions of the mutations
        self.tokens = set()   # argument names an error may name
        self.kinds = []       # mutation kinds applied

    def live(self, loc):
        """Whether loc still names a tensor (earlier mutations may have dropped or replaced it)."""
        k, i = loc
        v = self.args.get(k)
        if i is not None:
            if not isinstance(v, list) or i >= len(v):
                return False
            v = v[i]
        return isinstance(v, torch.Tensor)

    def get(self, loc):
        k, i = loc
        return self.args[k] if i is None else self.args[k][i]

    def put(self, loc, v):
        k, i = loc
        if i is None:
            self.args[k] = v
        else:  # copy: lists may be shared (an SGD call may pass exp_avg as exp_avg_sq)
            lst = list(self.args[k])
            lst[i] = v
            self.args[k] = lst


def name_of(loc):
    k, i = loc
    return k if i is None else f"{k}[{i}]"


def build_update(case):
    rng, dev = case.rng, case.dev
    n = rng.choice([0, 1, 1, 2, 3, 4])
    opt_name = rng.choice(["sgd", "adam", "adamw"])
    shapes = [rng.choice([(rng.randint(1, 7),), (rng.randint(1, 4), rng.randint(1, 4)),
                          (2, rng.randint(1, 3), 2), (0,), (1,)]) for _ in range(n)]
    ps = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    holder = ps or [torch.randn(1, device=dev, requires_grad=True)]  # FPTT needs one
    if len(holder) > 1 and rng.random() < 0.5:  # two groups: group_of holds 0 and 1
        groups = [{"params": holder[:1]}, {"params": holder[1:], "lr": 0.02}]
    else:
        groups = [{"params": holder}]
    kw = dict(optimizer=opt_name, lr=0.01, clip=rng.choice([None, 0.5, 3.0]),
              backend="cuda" if dev == "cuda" else "cpu")
    if opt_name == "sgd":
        kw["momentum"] = rng.choice([0.0, 0.9])
    opt = fptt_fast.FPTT(groups, **kw)
    for p in holder:
        p.grad = torch.randn_like(p)
    _, _, st = opt._gather()
    sgd = opt_name == "sgd"
    a = case.args
    a.update({k: (list(getattr(st, k)) if n else []) for k in
              ("params", "grads", "w_bar", "lam", "exp_avg", "exp_avg_sq", "step", "group_of")})
    a.update(hyper=opt._hyper_table(torch.device(dev)), optimizer=st.optimizer, clip=st.clip)
    if sgd and rng.random() < 0.5:  # exp_avg_sq is not read for SGD: [] or exp_avg again
        a["exp_avg_sq"] = []
    if case.flavour == "cuda":
        a["status"] = opt._status
    for i in range(n):
        for k in ("params", "grads", "w_bar", "lam", "exp_avg", "step") + (() if sgd else ("exp_avg_sq",)):
            case.used.append((k, i))
            if k != "grads":
                case.written.add((k, i))
    case.used.append(("hyper", None))
    if case.flavour == "cuda":
        case.used.append(("status", None))
        case.written.add(("status", None))
    case.lists = ["params", "grads", "w_bar", "lam", "exp_avg", "step", "group_of"] + \
        ([] if sgd else ["exp_avg_sq"])
    case.ints = ["optimizer"] + (["group_of"] if n else [])
    case.floats = ["clip"]
    case.keep = [p.detach() for p in holder] + [p.grad for p in holder] + \
        list(opt.flat_state.values()) + [a["hyper"], opt._status]
    case.keep_objects = (opt, holder)  # alive until the comparison


def build_lstm(case):
    rng, dev = case.rng, case.dev
    I, H, O = rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 4)
    T, B = rng.randint(1, 4), rng.randint(1, 3)
    loss = rng.choice(["mse", "ce"])
    per_step = rng.random() < 0.5
    opt_name = rng.choice(["sgd", "adam", "adamw"])
    m = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, optimizer=opt_name,
                           clip=rng.choice([None, 1.0]), device=dev,
                           backend="cuda" if dev == "cuda" else "cpu")
    opt = m.optimizer
    sgd = opt_name == "sgd"
    params = [p.detach() for p in m.fptt_parameters()]
    sts = [opt.state[p] for p in m.fptt_parameters()]
    lead = (T, B) if per_step else (B,)
    a = case.args
    a.update(x=torch.randn(T, B, I, device=dev),
             target=(torch.randn(*lead, O, device=dev) if loss == "mse"
                     else torch.randint(0, O, lead, device=dev)),
             h0=torch.randn(B, H, device=dev), c0=torch.randn(B, H, device=dev),
             params=params, grads=[torch.zeros_like(p) for p in params],
             loss=LOSS_CODE[loss], per_step=per_step, weight=rng.choice([1.0, 0.5, 2.0]),
             w_bar=[s["w_bar"] for s in sts], lam=[s["lam"] for s in sts],
             exp_avg=[s["momentum_buffer"] if sgd else s["exp_avg"] for s in sts],
             step=[s["step"].view(1) for s in sts], hyper=opt._hyper_table(torch.device(dev)),
             group_of=[0] * 6, optimizer=OPT_CODE[opt_name], clip=float(opt.clip or 0.0),
             status=opt._status)
    if case.flavour == "cpu":
        update = rng.random() < 0.75
        # SGD: no exp_avg_sq, or exp_avg again as FPTT.kernel_state gives it (not read)
        a.update(update=update, exp_avg_sq=rng.choice([[], a["exp_avg"]]) if sgd
                 else [s["exp_avg_sq"] for s in sts],
                 workspace=rng.choice([torch.empty(0), torch.zeros(rng.randint(1, 40)),
                                       torch.zeros(5000)]),
                 builtin_gemm=rng.random() < 0.3)
    else:
        update = True
        a.update(exp_avg_sq=a["exp_avg"] if sgd else [s["exp_avg_sq"] for s in sts],
                 losses=torch.zeros((), device=dev), tf32=False,
                 # h_out/c_out may be h0/c0 (documented in cuda_lstm.h): sometimes they are
                 h_out=a["h0"] if rng.random() < 0.2 else torch.zeros(B, H, device=dev),
                 c_out=a["c0"] if rng.random() < 0.2 else torch.zeros(B, H, device=dev))
    for k in ("x", "target", "h0", "c0"):
        case.used.append((k, None))
    for i in range(6):
        case.used += [("params", i), ("grads", i)]
        case.written.add(("grads", i))
        if update:
            case.written.add(("params", i))
            for k in STATE_LISTS:
                if k != "exp_avg_sq" or not sgd:
                    case.used.append((k, i))
                    case.written.add((k, i))
    case.lists = ["params", "grads"]
    case.ints = ["loss"]
    case.floats = ["weight"]
    if update:
        case.used.append(("hyper", None))
        case.lists += ["w_bar", "lam", "exp_avg", "step", "group_of"] + ([] if sgd else ["exp_avg_sq"])
        case.ints += ["optimizer", "group_of"]
        case.floats.append("clip")
    if update:
        case.used.append(("status", None))
        case.written.add(("status", None))
    if case.flavour == "cpu":
        case.used.append(("workspace", None))
        case.written.add(("workspace", None))
    else:
        for k in ("h_out", "c_out", "losses"):
            case.used.append((k, None))
            case.written.add((k, None))
        for o in ("h_out", "c_out"):
            for s in ("h0", "c0"):
                case.allowed.add(frozenset({(o, None), (s, None)}))
    case.keep = params + list(a["grads"]) + [a[k] for k in ("x", "target", "h0", "c0", "hyper")] + \
        list(opt.flat_state.values()) + [opt._status] + \
        ([a["workspace"]] if case.flavour == "cpu" else [a["h_out"], a["c_out"], a["losses"]])
    case.keep_objects = (m,)
    case.dims = (T, B, I, H, O)


def valid_case(target, index, seed=SEED):
    """The valid call of case `index` of `target` (a function of seed, target and index)."""
    rng = random.Random(f"{seed}:{target}:{index}")
    torch.manual_seed(rng.getrandbits(62))
    case = Case(target, rng)
    (build_update if case.family == "update" else build_lstm)(case)
    return case


def call(case):
    e, a = ext(), case.args
    state, segment, config = twins(a)
    if case.family == "update":
        if case.devtype:
            return check_ext().fused_update(state, case.flavour == "cuda", case.devtype)
        if case.flavour == "cpu":
            return e.fused_update_cpu(state)
        return e.fused_update_cuda(state)
    if case.flavour == "cpu":
        if case.devtype:
            return check_ext().lstm_segment_cpu(state, segment, config, a["workspace"],
                                                case.devtype)
        return e.lstm_segment_step_cpu(state, segment, config, a["workspace"])
    if case.devtype:
        return check_ext().lstm_segment_cuda(state, segment, config, case.devtype)
    return e.lstm_segment_step_cuda(state, segment, config)


# ---- mutations: each one alone makes the call invalid -------------------------------------
class NotApplicable(Exception):
    pass


def _other_device(case, t):
    if case.dev == "cuda":
        return t.cpu() if case.rng.random() < 0.7 else t.to("meta")
    return t.to("meta")


def _plain(case, t):
    """A tensor alias mutations can view: float32, contiguous, on the call's device."""
    return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_contiguous()
            and t.layout == torch.strided and t.device.type == case.dev and t.numel() >= 1
            and not t.is_neg())


def _pick_tensor(case, pred=lambda loc, t: True):
    locs = [loc for loc in case.used if case.live(loc) and pred(loc, case.get(loc))]
    if not locs:
        raise NotApplicable
    return case.rng.choice(locs)


def _required_dtype(case, loc):
    if loc == ("target", None) and case.args["loss"] == LOSS_CODE["ce"]:
        return torch.int64
    return torch.float32


def m_dtype(case):
    loc = _pick_tensor(case)
    want = _required_dtype(case, loc)
    dt = case.rng.choice([d for d in (torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                      torch.int64, torch.uint8, torch.bool) if d != want])
    case.put(loc, case.get(loc).to(dt))
    return f"dtype {name_of(loc)} -> {dt}", {name_of(loc)}


def m_device(case):
    loc = _pick_tensor(case, lambda loc, t: t.device.type == case.dev)
    case.put(loc, _other_device(case, case.get(loc)))
    return f"device {name_of(loc)} -> {case.get(loc).device}", {name_of(loc)}


def m_noncontig(case):
    loc = _pick_tensor(case, lambda loc, t: t.numel() >= 2 and t.layout == torch.strided)
    t = case.get(loc)
    how = case.rng.choice(["strided", "expanded", "transposed"])
    if how == "transposed" and t.dim() == 2 and min(t.shape) >= 2:
        new = t.t().contiguous().t()
    elif how == "expanded" and t.dim() >= 1:  # stride 0: one element seen numel times
        new = t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)
    else:
        how = "strided"
        buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
        buf[..., 0] = t
        new = buf[..., 0]
    if new.is_contiguous():
        raise NotApplicable
    case.put(loc, new)
    return f"non-contiguous ({how}) {name_of(loc)}", {name_of(loc)}


def _bumped(shape, rng):
    """The shape with one dimension changed, or a dimension added or removed."""
    shape = list(shape)
    r = rng.random()
    if shape and r < 0.6:
        d = rng.randrange(len(shape))
        shape[d] = shape[d] + 1 if shape[d] <= 1 or rng.random() < 0.5 else shape[d] - 1
    elif r < 0.8:
        shape.insert(rng.randint(0, len(shape)), rng.choice([1, 2]))
    elif len(shape) >= 2:
        shape = [shape[0] * shape[1]] + shape[2:]
    else:
        shape = shape + [2]
    return shape


def m_shape(case):
    rng = case.rng
    loc = _pick_tensor(case, lambda loc, t: loc[0] != "workspace")
    t = case.get(loc)
    k, i = loc
    tokens = {name_of(loc)}
    mk = lambda shape, dtype=t.dtype: torch.zeros(shape, dtype=dtype, device=t.device)  # noqa: E731
    if k == "step":
        new = mk(rng.choice([2, 0]))
    elif k == "hyper":
        G = t.shape[0]
        n = len(HYPER_FIELDS)
        new = mk(rng.choice([(G, n - 1), (G, n + 1), (n,), (G, n, 1)]))
    elif k in ("status", "losses"):
        new = mk(rng.choice([0, 2, 4]) if k == "status" else rng.choice([0, 2]))
    elif case.family == "update" or k in STATE_LISTS:
        # the update compares element counts with params[i]
        n = t.numel()
        new = mk(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
        if k == "params":
            tokens.add(f"grads[{i}]")  # params[i] sets the count the others must have
    elif k == "x":
        T, B, I = t.shape
        new = mk(rng.choice([(B, I), (1, T, B, I), (0, B, I), (T, 0, I), (T, B, 0)]))
    elif loc == ("params", 1):  # weight_hh: [4H, H]
        G, H = t.shape
        new = mk(rng.choice([(G + 1, H), (G, H + 1), (G * H,), (1, G, H), (0, H)]))
    elif loc == ("params", 4):  # head.weight: [O, H]
        O, H = t.shape
        new = mk(rng.choice([(O, H + 1), (O * H,), (0, H), (1, O, H)]))
    else:  # shapes implied by x, weight_hh and head.weight
        new = mk(_bumped(t.shape, rng))
    if new.shape == t.shape:
        raise NotApplicable
    case.put(loc, new)
    return f"shape {name_of(loc)} {tuple(t.shape)} -> {tuple(new.shape)}", tokens


def m_list_length(case):
    key = case.rng.choice(case.lists)
    if not isinstance(case.args[key], list):
        raise NotApplicable  # replaced by a python_type mutation
    lst = list(case.args[key])
    if lst and case.rng.random() < 0.5:
        lst.pop()
        how = "dropped"
    else:
        lst.append(0 if key == "group_of" else
                   (lst[-1].clone() if lst else torch.zeros(1, device=case.dev)))
        how = "appended"
    case.args[key] = lst
    return f"list length {key} {how} -> {len(lst)}", {key, "params"}


def m_python_type(case):
    rng = case.rng
    keys = [k for k in case.lists] + [name_of(loc) for loc in case.used if loc[1] is None]
    key = rng.choice(keys)
    if isinstance(case.args[key], list) and case.args[key] and rng.random() < 0.6:  # an element
        lst = list(case.args[key])
        j = rng.randrange(len(lst))
        lst[j] = rng.choice([None, "a string", 1.5, [1.0]])
        case.args[key] = lst
        return f"python type {key}[{j}] -> {type(lst[j]).__name__}", set()
    case.args[key] = rng.choice([None, "a string", object(), {}])
    return f"python type {key} -> {type(case.args[key]).__name__}", set()


def m_alias(case):
    rng = case.rng
    writable = [loc for loc in case.written if case.live(loc) and _plain(case, case.get(loc))]
    if not writable:
        raise NotApplicable
    w = rng.choice(sorted(writable, key=str))
    if w[0] == "grads" and rng.random() < 0.3 and ("params", w[1]) in case.used:
        s = ("params", w[1])  # the gradient buffer that is the parameter
    elif w[0] == "params" and rng.random() < 0.3:
        s = ("grads", w[1])
    else:
        others = [loc for loc in case.used if loc != w and frozenset({w, loc}) not in case.allowed
                  and case.live(loc) and _plain(case, case.get(loc))]
        if not others:
            raise NotApplicable
        s = rng.choice(others)
    if not case.live(s) or not _plain(case, case.get(s)):
        raise NotApplicable
    tw, ts = case.get(w), case.get(s)
    if ts.numel() >= tw.numel():  # w becomes a window of s's memory
        off = rng.randint(0, ts.numel() - tw.numel())
        case.put(w, ts.view(-1)[off:off + tw.numel()].view(tw.shape))
    else:  # s becomes a window of w's memory
        off = rng.randint(0, tw.numel() - ts.numel())
        case.put(s, tw.view(-1)[off:off + ts.numel()].view(ts.shape))
    return f"alias {name_of(w)} (written) with {name_of(s)}", {name_of(w), name_of(s)}


def m_code(case):
    rng = case.rng
    key = rng.choice(case.ints)
    if key == "optimizer":
        case.args[key] = rng.choice([-1, 3, 4, 100, -2 ** 40, 2 ** 40])
        return f"optimizer code {case.args[key]}", {"optimizer"}
    if key == "loss":
        case.args[key] = rng.choice([-1, 2, 3, 2 ** 33])
        return f"loss code {case.args[key]}", {"loss"}
    lst = case.args["group_of"]
    if not isinstance(lst, list) or not lst or not isinstance(case.args["hyper"], torch.Tensor):
        raise NotApplicable
    lst = list(lst)
    j = rng.randrange(len(lst))
    rows = case.args["hyper"].shape[0]
    lst[j] = rng.choice([-1, rows, rows + 3, -2 ** 35, 2 ** 40])
    case.args["group_of"] = lst
    return f"group_of[{j}] -> {lst[j]}", {"group"}


def m_float(case):
    key = case.rng.choice(case.floats)
    bad = [math.nan, math.inf, -math.inf] + ([-1.0, -1e-3] if key == "clip" else [])
    case.args[key] = case.rng.choice(bad)
    return f"{key} -> {case.args[key]}", {key}


def m_layout(case):
    loc = _pick_tensor(case, lambda loc, t: t.layout == torch.strided and t.dim() >= 1
                       and t.dtype == torch.float32 and t.device.type != "meta")
    t = case.get(loc)
    if case.rng.random() < 0.5:
        new, how = t.to_sparse(), "sparse"
    else:
        new, how = torch._neg_view(t), "lazily negated view"
    case.put(loc, new)
    return f"layout {name_of(loc)} -> {how}", {name_of(loc)}


def m_tf32(case):
    case.args["tf32"] = True
    return "tf32=True", {"tf32"}


def m_large_hidden(case):
    if not case.live(("params", 1)):
        raise NotApplicable
    # torch.empty: the pages are never touched, so 4 * 4097^2 floats cost nothing
    Hm = check_ext().lstm_cuda_max_hidden + 1
    case.put(("params", 1), torch.empty(4 * Hm, Hm, device=case.dev))
    return f"weight_hh_l0 [4H, H] with H={Hm}", {"kLstmMaxHidden"}


def m_ce_class(case):
    if not (case.live(("target", None)) and case.args["target"].dtype == torch.int64
            and case.live(("params", 4)) and case.args["params"][4].dim() == 2):
        raise NotApplicable
    t = case.args["target"].clone()
    O = case.args["params"][4].shape[0]
    t.view(-1)[case.rng.randrange(t.numel())] = case.rng.choice([-1, O, O + 5])
    case.args["target"] = t
    return "ce target class out of range", {"target"}


def m_workspace(case):
    import numpy as np
    if case.rng.random() < 0.5:  # numpy's storage cannot grow
        new, how = torch.from_numpy(np.zeros(1, dtype=np.float32)), "not resizable"
    else:
        new, how = torch.zeros(1, requires_grad=True), "requires grad"
    case.args["workspace"] = new
    return f"workspace too small and {how}", {"workspace"}


def mutators_for(case):
    """(kind, function, weight) of the mutations that apply to this call."""
    ms = [("dtype", m_dtype, 3), ("device", m_device, 3), ("noncontig", m_noncontig, 3),
          ("shape", m_shape, 4), ("list_length", m_list_length, 2),
          ("python_type", m_python_type, 1), ("alias", m_alias, 4), ("code", m_code, 2),
          ("float", m_float, 1), ("layout", m_layout, 1)]
    if case.family == "lstm" and case.flavour == "cuda":
        ms += [("tf32", m_tf32, 1), ("large_hidden", m_large_hidden, 1)]
    if case.family == "lstm" and case.flavour == "cpu":
        ms.append(("workspace", m_workspace, 1))
        if case.args["loss"] == LOSS_CODE["ce"] and case.dev == "cpu":
            ms.append(("ce_class", m_ce_class, 2))
    return ms


def fuzz_case(target, index, seed=SEED):
    """Case `index` of `target`: a valid call with 1 to 3 mutations (0 to 2 for the
    *_refuses_cpu targets, whose valid calls are already invalid)."""
    case = valid_case(target, index, seed)
    rng = case.rng
    refuses = target.endswith("_refuses_cpu")
    n_mut = rng.choice([0, 1, 2]) if refuses else rng.choice([1, 1, 1, 2, 3])
    ms = mutators_for(case)
    tries = 0
    while len(case.muts) < n_mut:
        kind, fn, _ = rng.choices(ms, weights=[w for _, _, w in ms])[0]
        tries += 1
        assert tries < 100, f"no mutation applies to case {index} of {target}"
        if kind == "large_hidden" and len(case.muts) < n_mut - 1:
            continue  # last only: later mutations would copy its 4 * 4097^2 floats
        try:
            desc, tokens = fn(case)
        except NotApplicable:
            continue
        case.muts.append(desc)
        case.kinds.append(kind)
        case.tokens |= tokens
    if refuses:
        case.kinds.append("device_type_cuda_with_cpu_tensors")
        case.tokens = set()  # the first CPU tensor checked is named, whichever it is
    return case


# ---- the worker: python tests/test_bindings.py N SEED TARGET... ---------------------------
def _bytes(t):
    return t.detach().reshape(-1).view(torch.uint8) if t.numel() else t.detach().reshape(-1)


def _names_one_of(msg, tokens):
    return any(re.search(r"(?<![A-Za-z0-9_])" + re.escape(tok) + r"(?![A-Za-z0-9_])", msg)
               for tok in tokens)


def worker(targets, n, seed):
    def log(**kw):
        print(json.dumps(kw), flush=True)

    for target in targets:
        log(ev="begin", t=target)
        if target == "selftest_crash":  # for test_the_harness_reports_what_goes_wrong
            for i in range(n):
                log(ev="start", t=target, i=i, muts=[])
                if i == 3:
                    os.kill(os.getpid(), signal.SIGSEGV)
        kinds = Counter()
        for i in range(n if target in TARGETS or target == "selftest_valid" else 0):
            # selftest_valid: valid calls, which must be reported as not raising and changing
            case = (valid_case("fused_update_cpu", i, seed) if target == "selftest_valid"
                    else fuzz_case(target, i, seed))
            snap = [(t, t.shape, _bytes(t).clone()) for t in case.keep]
            kinds.update(set(case.kinds))
            log(ev="start", t=target, i=i, muts=case.muts)
            try:
                call(case)
            except EXPECTED_ERRORS as e:
                msg = str(e).split("\n")[0]
                log(ev="raised", t=target, i=i, type=type(e).__name__, msg=msg[:300])
                if (isinstance(e, RuntimeError) and case.tokens
                        and not _names_one_of(msg, case.tokens)):
                    log(ev="unnamed", t=target, i=i, muts=case.muts, tokens=sorted(case.tokens),
                        msg=msg[:300])
            except BaseException as e:  # noqa: BLE001 - reported as a failure, not swallowed
                log(ev="badtype", t=target, i=i, muts=case.muts, type=type(e).__name__,
                    msg=str(e)[:300])
            else:
                log(ev="noraise", t=target, i=i, muts=case.muts)
            if case.dev == "cuda":
                torch.cuda.synchronize()
            changed = [k for k, (t, shape, b) in enumerate(snap)
                       if t.shape != shape or not torch.equal(_bytes(t), b)]
            if changed:
                log(ev="changed", t=target, i=i, muts=case.muts, tensors=changed)
        log(ev="done", t=target, n=n, kinds=dict(kinds))


def run_targets(targets, n=N_CASES, seed=SEED):
    """Every target's cases in worker subprocesses: one process for all of them (importing
    torch and building the first optimiser take about 6 s per process); after a crash, a
    fresh process goes on with the targets after the one that crashed. Returns
    {target: {"events": [...], "crash": None or (exit code, last event, stderr tail)}}."""
    results = {t: {"events": [], "crash": None} for t in targets}
    remaining = list(targets)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while remaining:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(n), str(seed),
                               *remaining], capture_output=True, text=True, timeout=600, cwd=root)
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for e in events:
            results[e["t"]]["events"].append(e)
        if proc.returncode == 0:
            break
        last = events[-1] if events else {"t": remaining[0]}
        results[last["t"]]["crash"] = (proc.returncode, last, proc.stderr[-3000:])
        remaining = remaining[remaining.index(last["t"]) + 1:]
    return results


@pytest.fixture(scope="module")
def fuzz_results():
    gpu = HAS_CUDA and ext().with_cuda()
    return run_targets([t for t in TARGETS if t not in GPU_TARGETS or gpu])


# ---- tests ------------------------------------------------------------------------------
@pytest.mark.timeout(600)  # the first one runs every target's worker (fuzz_results)
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzzed_bad_arguments_raise_and_change_nothing(target, fuzz_results):
    if target in GPU_TARGETS and not HAS_CUDA:
        pytest.skip("needs a GPU: the CUDA bindings themselves (their checks are fuzzed on CPU "
                    "through the *_cuda_checks targets)")
    assert target in fuzz_results, "a GPU is present but fptt_fast._C was built without CUDA"
    r = fuzz_results[target]
    assert r["crash"] is None, (
        "the worker died (exit code {}) at {}\nstderr:\n{}".format(*r["crash"]))
    events = r["events"]
    done = [e for e in events if e["ev"] == "done"]
    assert done and done[0]["n"] == N_CASES, "the worker did not finish this target"
    bad = [e for e in events if e["ev"] in ("noraise", "badtype", "changed", "unnamed")]
    assert not bad, f"{len(bad)} bad cases, first ones:\n" + "\n".join(map(json.dumps, bad[:10]))
    raised = [e for e in events if e["ev"] == "raised"]
    assert len(raised) == N_CASES
    # the fuzz must really cover each kind of mutation that applies to this target
    kinds = done[0]["kinds"]
    family, flavour, _, _ = TARGETS[target]
    expect = ["dtype", "device", "noncontig", "shape", "list_length", "python_type", "alias",
              "code", "float", "layout"]
    if family == "lstm" and flavour == "cuda":
        expect += ["tf32", "large_hidden"]
    if family == "lstm" and flavour == "cpu":
        expect += ["workspace", "ce_class"]
    if target.endswith("_refuses_cpu"):
        expect = ["device_type_cuda_with_cpu_tensors", "shape", "alias"]
    missing = {k: kinds.get(k, 0) for k in expect if kinds.get(k, 0) < 3}
    assert not missing, f"mutation kinds drawn fewer than 3 times: {missing}"
    # and RuntimeErrors from the C++ checks, not only pybind's TypeErrors
    assert sum(e["type"] == "RuntimeError" for e in raised) >= N_CASES // 2


def test_the_harness_reports_what_goes_wrong():
    """The harness itself: a worker killed by a signal is reported with the case it was
    running and the targets after it still run (in a fresh worker); calls that do not raise
    and change tensors (valid ones, here) are reported as such."""
    r = run_targets(["selftest_crash", "selftest_valid", "fused_update_cpu"], n=6)
    code, last, _ = r["selftest_crash"]["crash"]
    assert code != 0 and last["ev"] == "start" and last["i"] == 3
    valid = r["selftest_valid"]
    assert valid["crash"] is None
    assert sum(e["ev"] == "noraise" for e in valid["events"]) == 6
    assert sum(e["ev"] == "changed" for e in valid["events"]) >= 3  # those with parameters
    assert r["fused_update_cpu"]["crash"] is None
    assert sum(e["ev"] == "raised" for e in r["fused_update_cpu"]["events"]) == 6


def test_case_list_is_deterministic():
    for target in ("fused_update_cpu", "lstm_segment_cuda_checks"):
        a = [fuzz_case(target, i).muts for i in range(15)]
        b = [fuzz_case(target, i).muts for i in range(15)]
        assert a == b
        assert len({str(m) for m in a}) > 5  # and not the same case over and over


def test_former_segfault_inputs_raise():
    """The inputs of the two tests that segfaulted on an H200, with CPU tensors standing in
    (test_update_cuda.py::test_status_checks, test_lstm_cuda.py::
    test_binding_refuses_tf32_and_large_hidden; they run as such on a GPU)."""
    cx = check_ext()
    p, g = torch.randn(10), torch.randn(10)
    z = lambda: torch.zeros(10)  # noqa: E731
    hyper = torch.zeros(1, len(fptt_fast.optim.HYPER_FIELDS))
    args = dict(params=[p], grads=[g], w_bar=[z()], lam=[z()], exp_avg=[z()],
                exp_avg_sq=[z()], step=[torch.zeros(1)], hyper=hyper, group_of=[0],
                optimizer=1, clip=0.0, status=torch.zeros(3))
    cx.fused_update(twins(args)[0], True, "cpu")  # valid with CPU stand-ins
    with pytest.raises(RuntimeError, match=r"params\[0\] must be a CUDA tensor"):
        cx.fused_update(twins(args)[0], True, "cuda")
    for bad, what in ((torch.zeros(4), "3 floats"), (torch.zeros(3, dtype=torch.float64), "float32"),
                      (torch.zeros(3, device="meta"), "CPU tensor")):
        with pytest.raises(RuntimeError, match="status.*" + what):
            cx.fused_update(twins(dict(args, status=bad))[0], True, "cpu")

    case = valid_case("lstm_segment_cuda_checks", 0)
    a = case.args
    assert call(case) == case.dims
    a["tf32"] = True
    with pytest.raises(RuntimeError, match="tf32"):
        call(case)
    a["tf32"] = False
    H = cx.lstm_cuda_max_hidden + 1
    a["params"] = list(a["params"])
    a["params"][1] = torch.empty(4 * H, H)
    with pytest.raises(RuntimeError, match="kLstmMaxHidden"):
        call(case)


def _scaled_err(a, b, scale):
    return (a.double() - b.double()).abs().max().item() / scale if a.numel() else 0.0


@pytest.mark.parametrize("index", range(12))
def test_valid_update_calls_pass_and_match_reference(index):
    """A valid call (fuzzer's base, as FPTT.step builds it) passes both flavours' checks,
    and fused_update_cpu then does what the reference update does."""
    case = valid_case("fused_update_cpu", index)
    a = case.args
    opt, holder = case.keep_objects
    assert check_ext().fused_update(twins(a)[0], False, "cpu") is None
    assert check_ext().fused_update(twins(dict(a, status=torch.zeros(3)))[0], True, "cpu") is None
    # the reference: an identical optimiser on clones, backend="reference"
    groups = [dict(g, params=[p.detach().clone().requires_grad_() for p in g["params"]])
              for g in opt.param_groups]
    copies = [q for g in groups for q in g["params"]]
    ref = fptt_fast.FPTT(groups, optimizer=opt.base, clip=opt.clip, backend="reference")
    for p, q in zip(holder, copies):
        q.grad = p.grad.clone()
    norm, skipped = ext().fused_update_cpu(twins(a)[0])
    if not a["params"]:
        return  # nothing to compare: the call must simply succeed
    ref.step()
    assert not skipped and math.isfinite(norm)
    scale = max([1.0] + [q.abs().max().item() for q in copies if q.numel()])
    for p, q in zip(holder, copies):
        assert _scaled_err(p.detach(), q.detach(), scale) <= 2e-5
        for k, t in ref.state[q].items():
            assert _scaled_err(opt.state[p][k], t, scale) <= 2e-5, k


def test_read_only_gradients_may_share_memory():
    """Gradients are inputs of the update: one buffer for two parameters is accepted, and
    gives what two copies give."""
    ps = [torch.randn(6) for _ in range(2)]
    g = torch.randn(6)
    outs = []
    for grads in ([g, g], [g.clone(), g.clone()]):
        w = [p.clone() for p in ps]
        st = [[torch.zeros(6) for _ in w] for _ in range(4)]
        steps = [torch.zeros(1) for _ in w]
        hyper = torch.tensor([[0.01, 0.5, 0.5, 0.0, 1.0, 0.0, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0]])
        ext().fused_update_cpu(FpttState(w, grads, st[0], st[1], st[2], st[3], steps, hyper,
                                         [0, 0], optimizer=1, clip=0.0))
        outs.append(w)
    for u, v in zip(*outs):
        assert torch.equal(u, v)


def _check_cpu(a):
    """lstm_segment_step_cpu's checks on the call `a` (flat fields): (T, B, I, H, O)."""
    return check_ext().lstm_segment_cpu(*twins(a), a["workspace"], "cpu")


def test_small_workspace_is_not_mistaken_for_an_overlap():
    """A workspace smaller than the segment needs is grown by a reallocation, so the memory
    after it (here: gradient buffers allocated right after it) is not the workspace's. The
    fuzz once flagged this false overlap (by chance of addresses); here, 40 tries."""
    case = valid_case("lstm_segment_step_cpu", 1)
    a = case.args
    for n in range(1, 41):
        a["workspace"] = torch.zeros(n)
        a["grads"] = [torch.zeros_like(p) for p in a["params"]]
        assert _check_cpu(a) == case.dims
    a["grads"] = [a["workspace"][:0]] + a["grads"][1:]  # empty: no memory, no overlap
    with pytest.raises(RuntimeError, match=r"grads\[0\]"):
        _check_cpu(a)  # wrong shape
    big = torch.zeros(10 ** 4)  # a workspace sharing its storage with a gradient buffer
    a["workspace"], a["grads"] = big[:5], [big[5000:5000 + a["params"][0].numel()].view_as(
        a["params"][0])] + [torch.zeros_like(p) for p in a["params"][1:]]
    with pytest.raises(RuntimeError, match=r"grads\[0\] shares memory with workspace"):
        _check_cpu(a)


@pytest.mark.parametrize("index", range(8))
def test_valid_lstm_calls_pass_and_match_reference(index):
    """A valid call (fuzzer's base, as FPTTLSTM builds it) passes the CPU checks and the
    CUDA binding's checks (CPU stand-ins, h_out possibly aliasing h0), and
    lstm_segment_step_cpu then matches the reference backend."""
    case = valid_case("lstm_segment_step_cpu", index)
    a = case.args
    (m,) = case.keep_objects
    assert _check_cpu(a) == case.dims
    cuda_case = valid_case("lstm_segment_cuda_checks", index)
    assert call(cuda_case) == cuda_case.dims
    ref = fptt_fast.FPTTLSTM(*case.dims[2:], loss=m.loss, per_step=m.per_step,
                             optimizer=m.optimizer.base, clip=m.optimizer.clip, backend="reference")
    ref.load_lstm_state_dict(m.lstm_state_dict())
    x, y, h0, c0 = a["x"], a["target"], a["h0"].clone(), a["c0"].clone()
    loss, h, c = ext().lstm_segment_step_cpu(*twins(a), a["workspace"])
    assert a["workspace"].numel() >= 1  # grown if it was too small
    if a["update"]:
        l_ref, (h_ref, c_ref) = ref.train_segment(x, y, (h0, c0), weight=a["weight"])
        scale = max(p.abs().max().item() for p in ref.fptt_parameters())
        for p, q in zip(m.fptt_parameters(), ref.fptt_parameters()):
            assert _scaled_err(p.detach(), q.detach(), scale) <= 1e-4
        st = a["status"]  # [norm, last skipped, skipped count], as the reference's
        assert st[1:].tolist() == [0.0, float(ref.optimizer.skipped_steps)]
        norm = ref.optimizer.last_norm.item()
        assert abs(st[0].item() - norm) <= 1e-4 * max(1.0, norm)
    else:
        l_ref, (h_ref, c_ref), grads = ref.loss_and_grads(x, y, (h0, c0), weight=a["weight"])
        for g, r in zip(a["grads"], grads.values()):
            assert _scaled_err(g, r, max(1.0, r.abs().max().item())) <= 1e-4
    assert abs(loss - l_ref.item()) <= 1e-4 * max(1.0, abs(l_ref.item()))
    assert _scaled_err(h, h_ref, 1.0) <= 1e-4 and _scaled_err(c, c_ref, 1.0) <= 1e-4


def _signature_arity(doc: str, name: str) -> list:
    """The argument counts of each overload of `name` in a pybind11 docstring (arguments
    separated by commas outside brackets; a method's self counted out)."""
    counts = []
    for line in doc.splitlines():
        m = re.match(r"\s*(?:\d+\.\s*)?" + re.escape(name) + r"\((.*)\)( ->.*)?$", line)
        if not m:
            continue
        depth, n, seen = 0, 0, False
        for ch in m.group(1):
            depth += ch in "[(<{"
            depth -= ch in "])>}"
            if ch == "," and depth == 0:
                n += 1
            seen = seen or not ch.isspace()
        args = n + 1 if seen else 0
        counts.append(args - (1 if m.group(1).lstrip().startswith("self") else 0))
    return counts


def test_compute_bindings_take_at_most_eight_arguments():
    """Every function and method of fptt_fast._C takes at most 8 arguments (the state,
    segment and config objects instead of parallel lists), and no test-only or tuning entry
    point is in the shipped module (tuning ones need FPTT_FAST_TUNING=1)."""
    e = ext()
    checked = 0
    for name in dir(e):
        obj = getattr(e, name)
        members = [(name, obj)]
        if isinstance(obj, type):
            members = [(m, getattr(obj, m)) for m in ("__init__", *vars(obj))
                       if not m.startswith("_") or m == "__init__"]
        for mname, fn in members:
            if type(fn).__name__ not in ("builtin_function_or_method", "instancemethod"):
                continue
            arities = _signature_arity(fn.__doc__ or "", mname)
            assert arities, f"{name}.{mname}: no signature in its docstring"
            assert max(arities) <= 8, f"{name}.{mname} takes {max(arities)} arguments"
            checked += 1
    assert checked >= 10  # able to fail: the walk found the bindings
    assert "lstm_segment_step_cpu" in dir(e) and "CpuLstmPlan" in dir(e)
    leftovers = [n for n in dir(e) if n.startswith(("_check_", "_lstm_persistent_"))]
    assert not leftovers, leftovers


if __name__ == "__main__":
    worker(sys.argv[3:], int(sys.argv[1]), int(sys.argv[2]))
