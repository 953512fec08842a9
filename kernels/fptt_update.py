"""The fused FPTT update (docs/ALGORITHM.md, steps 2-6) as ONE Triton kernel launch.

Called by fptt_fast.FPTT for backend="triton" as fused_update(state) (a
fptt_fast.seam.FpttState); kernels/lstm_segment.py and lstm_persistent.py run the same
update_phase1 / grid_barrier / update_phase2 helpers on plans from get_plan. Contracts:
the math and its order of operations are fptt_math.h's; the norm is a fixed-order sum of
per-chunk partials, bitwise the same for any grid; launches sharing a plan must be
stream-ordered; no host sync.
Design: docs/KERNELS.md#kernelsfptt_updatepy
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from fptt_fast.layout import H_INDEX, HYPER_FIELDS, OPT_CODE

# Tensor-table columns (int64 each).
_C_W = tl.constexpr(0)
_C_G = tl.constexpr(1)
_C_WBAR = tl.constexpr(2)
_C_LAM = tl.constexpr(3)
_C_S1 = tl.constexpr(4)
_C_S2 = tl.constexpr(5)
_C_STEP = tl.constexpr(6)
_C_NUMEL = tl.constexpr(7)
_C_GROUP = tl.constexpr(8)
_NCOLS = tl.constexpr(9)

# Hyper-parameter row and optimiser codes: fptt_fast/layout.py (the one definition, checked
# against fptt_fast._C when it loads); Triton needs each index as a constexpr.
_H_LR = tl.constexpr(H_INDEX["lr"])
_H_ALPHA = tl.constexpr(H_INDEX["alpha"])
_H_BETA = tl.constexpr(H_INDEX["beta"])
_H_RHO = tl.constexpr(H_INDEX["rho"])
_H_C = tl.constexpr(H_INDEX["c"])
_H_WD = tl.constexpr(H_INDEX["weight_decay"])
_H_BETA1 = tl.constexpr(H_INDEX["beta1"])
_H_BETA2 = tl.constexpr(H_INDEX["beta2"])
_H_EPS = tl.constexpr(H_INDEX["eps"])
_H_MOM = tl.constexpr(H_INDEX["momentum"])
_H_DAMP = tl.constexpr(H_INDEX["dampening"])
_H_NEST = tl.constexpr(H_INDEX["nesterov"])
_H_DEC = tl.constexpr(H_INDEX["decoupled"])
_H_COUNT = tl.constexpr(len(HYPER_FIELDS))

OPT_SGD, OPT_ADAM, OPT_ADAMW = OPT_CODE["sgd"], OPT_CODE["adam"], OPT_CODE["adamw"]


# ----------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------


@triton.jit
def grid_barrier(bar_ptr, n_programs):
    """Sense-reversing barrier over all programs; see the module docstring."""
    tl.debug_barrier()
    gen_ptr = bar_ptr + 1
    gen = tl.atomic_add(gen_ptr, 0)           # atomic read, ordered before the arrival
    arrived = tl.atomic_add(bar_ptr, 1)       # acq_rel: our writes are released
    if arrived == n_programs - 1:
        tl.atomic_xchg(bar_ptr, 0)            # reset for the next barrier/launch ...
        tl.atomic_add(gen_ptr, 1)             # ... then release everybody
    else:
        cur = tl.atomic_add(gen_ptr, 0)
        while cur == gen:
            cur = tl.atomic_add(gen_ptr, 0)   # acquire: the others' writes are visible
    tl.debug_barrier()


@triton.jit
def _regulariser_grad(w, wb, lam, alpha, rho, cc):
    """Step 2's term, fptt::regulariser_grad: zero when alpha == 0 (the regulariser off)."""
    return tl.where(alpha == 0.0, 0.0, (rho - 1.0) * lam + (cc * alpha) * (w - wb))


@triton.jit
def _norm_input(g, r, dec):
    """fptt::norm_input: what the clip's norm sums (decoupled: g + 0 * r, so that a
    non-finite w_bar or lam reaches the norm)."""
    return tl.where(dec, g + 0.0 * r, g + r)


@triton.jit
def update_phase1(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, n_chunks, pid, nprog,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 1 (module docstring): per-chunk sum of squares of the regularised gradient
    and the per-chunk copy of the step count, for the chunks pid, pid+nprog, ...
    Shared with kernels/lstm_segment.py."""
    lanes = tl.arange(0, BLOCK)

    for k in range(pid, n_chunks, nprog):
        t = tl.load(chunk_ptr + 2 * k)
        start = tl.load(chunk_ptr + 2 * k + 1)
        row = tab_ptr + t * _NCOLS
        n = tl.load(row + _C_NUMEL)
        hrow = hyper_ptr + tl.load(row + _C_GROUP) * _H_COUNT
        alpha = tl.load(hrow + _H_ALPHA)
        rho = tl.load(hrow + _H_RHO)
        cc = tl.load(hrow + _H_C)
        dec = tl.load(hrow + _H_DEC) == 1.0
        w_p = tl.load(row + _C_W).to(tl.pointer_type(tl.float32))
        g_p = tl.load(row + _C_G).to(tl.pointer_type(tl.float32))
        wb_p = tl.load(row + _C_WBAR).to(tl.pointer_type(tl.float32))
        lam_p = tl.load(row + _C_LAM).to(tl.pointer_type(tl.float32))
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        length = tl.minimum(n - start, CHUNK)  # the last chunk of a tensor may be short
        for off in range(0, length, BLOCK):
            idx = start + off + lanes
            m = idx < n
            w = tl.load(w_p + idx, mask=m, other=0.0)
            g = tl.load(g_p + idx, mask=m, other=0.0)
            wb = tl.load(wb_p + idx, mask=m, other=0.0)
            lam = tl.load(lam_p + idx, mask=m, other=0.0)
            gr = _norm_input(g, _regulariser_grad(w, wb, lam, alpha, rho, cc), dec)
            gd = gr.to(tl.float64)
            acc += tl.where(m, gd * gd, 0.0)
        tl.store(partial_ptr + k, tl.sum(acc, axis=0))
        # The step count before this update, copied while nobody can be writing it.
        step_p = tl.load(row + _C_STEP).to(tl.pointer_type(tl.float32))
        tl.store(cstep_ptr + k, tl.load(step_p))



@triton.jit
def update_phase2(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks,
                  clip, pid, nprog, OPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  PBLOCK: tl.constexpr):
    """Phase 2 (module docstring), after a grid barrier that follows phase 1 in every
    program: the global norm, the clip coefficient, status (program 0) and, if the norm
    is finite, steps 3-6 on the owned chunks. Shared with kernels/lstm_segment.py."""
    lanes = tl.arange(0, BLOCK)
    plan = tl.arange(0, PBLOCK)
    sacc = tl.zeros([PBLOCK], dtype=tl.float64)
    for p0 in range(0, n_chunks, PBLOCK):
        pi = p0 + plan
        sacc += tl.load(partial_ptr + pi, mask=pi < n_chunks, other=0.0, cache_modifier=".cg")
    norm = tl.sqrt(tl.sum(sacc, axis=0))
    # isfinite on the bits (immune to any fast-math folding of x != x), of the norm as
    # the float32 the reference computes: a double norm beyond FLT_MAX is not finite.
    norm32 = norm.to(tl.float32)
    bits = norm32.to(tl.int32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    # Step 3, fptt::clip_coefficient: clip <= 0 means no clipping.
    q = tl.div_rn(clip, norm32 + 1e-6)
    coef = tl.where(clip > 0.0, tl.where(q < 1.0, q, 1.0), 1.0)

    if pid == 0:
        skip = tl.where(finite, 0.0, 1.0)
        tl.store(status_ptr + 0, norm32)
        tl.store(status_ptr + 1, skip)
        tl.store(status_ptr + 2, tl.load(status_ptr + 2) + skip)

    if finite:
        for k in range(pid, n_chunks, nprog):
            t = tl.load(chunk_ptr + 2 * k)
            start = tl.load(chunk_ptr + 2 * k + 1)
            row = tab_ptr + t * _NCOLS
            n = tl.load(row + _C_NUMEL)
            hrow = hyper_ptr + tl.load(row + _C_GROUP) * _H_COUNT
            lr = tl.load(hrow + _H_LR)
            alpha = tl.load(hrow + _H_ALPHA)
            beta = tl.load(hrow + _H_BETA)
            rho = tl.load(hrow + _H_RHO)
            cc = tl.load(hrow + _H_C)
            wd = tl.load(hrow + _H_WD)
            dec = tl.load(hrow + _H_DEC) == 1.0
            w_p = tl.load(row + _C_W).to(tl.pointer_type(tl.float32))
            g_p = tl.load(row + _C_G).to(tl.pointer_type(tl.float32))
            wb_p = tl.load(row + _C_WBAR).to(tl.pointer_type(tl.float32))
            lam_p = tl.load(row + _C_LAM).to(tl.pointer_type(tl.float32))
            s1_p = tl.load(row + _C_S1).to(tl.pointer_type(tl.float32))
            step_before = tl.load(cstep_ptr + k)  # our own phase-1 copy
            # alpha == 0 (regulariser off) discards steps 5-6: divide by 1 there, not by 0
            beta_over_alpha = tl.div_rn(beta, tl.where(alpha == 0.0, 1.0, alpha))
            if OPT == 0:
                mom = tl.load(hrow + _H_MOM)
                damp = tl.load(hrow + _H_DAMP)
                nest = tl.load(hrow + _H_NEST)
                first = step_before == 0.0
                use_buf = mom != 0.0
            else:
                s2_p = tl.load(row + _C_S2).to(tl.pointer_type(tl.float32))
                beta1 = tl.load(hrow + _H_BETA1)
                beta2 = tl.load(hrow + _H_BETA2)
                eps = tl.load(hrow + _H_EPS)
                # fptt::step_scalars: t = step + 1, in float64.
                # beta1**t and beta2**t by binary exponentiation in float64 (a few
                # float64 ulps from pow(), the same float32 scalars in practice; no
                # libdevice needed, and inlined: cheaper in the interpreter).
                e = step_before.to(tl.int64) + 1
                b1 = beta1.to(tl.float64)
                b2 = beta2.to(tl.float64)
                p1 = b1 * 0.0 + 1.0
                p2 = b2 * 0.0 + 1.0
                while e > 0:
                    odd = (e & 1) != 0
                    p1 = tl.where(odd, p1 * b1, p1)
                    p2 = tl.where(odd, p2 * b2, p2)
                    b1 = b1 * b1
                    b2 = b2 * b2
                    e = e >> 1
                step_size = (lr.to(tl.float64) / (1.0 - p1)).to(tl.float32)
                bc2_sqrt = tl.sqrt(1.0 - p2).to(tl.float32)
            length = tl.minimum(n - start, CHUNK)
            for off in range(0, length, BLOCK):
                idx = start + off + lanes
                m = idx < n
                w = tl.load(w_p + idx, mask=m, other=0.0)
                g = tl.load(g_p + idx, mask=m, other=0.0)
                wb = tl.load(wb_p + idx, mask=m, other=0.0)
                lam = tl.load(lam_p + idx, mask=m, other=0.0)
                # steps 2 and 3
                r = _regulariser_grad(w, wb, lam, alpha, rho, cc)
                gc = tl.where(dec, g, g + r) * coef  # the base optimiser's input
                # step 4
                if OPT == 0:
                    mb = tl.where(use_buf, m, False)
                    buf = tl.load(s1_p + idx, mask=mb, other=0.0)
                    d = gc + wd * w
                    buf = tl.where(first, d, buf * mom + (1.0 - damp) * d)
                    dn = tl.where(nest != 0.0, d + mom * buf, buf)
                    d = tl.where(use_buf, dn, d)
                    tl.store(s1_p + idx, buf, mask=mb)
                    w = w - lr * d
                else:
                    ea = tl.load(s1_p + idx, mask=m, other=0.0)
                    eas = tl.load(s2_p + idx, mask=m, other=0.0)
                    if OPT == 2:
                        w = w * (1.0 - lr * wd)
                    else:
                        gc = gc + wd * w
                    ea = ea + (1.0 - beta1) * (gc - ea)
                    eas = eas * beta2 + (1.0 - beta2) * gc * gc
                    denom = tl.div_rn(tl.sqrt_rn(eas), bc2_sqrt) + eps
                    w = w - step_size * tl.div_rn(ea, denom)
                    tl.store(s1_p + idx, ea, mask=m)
                    tl.store(s2_p + idx, eas, mask=m)
                w = tl.where(dec, w - lr * r, w)  # decoupled: the regulariser's own step
                # steps 5 and 6: new w, old w_bar, then new lam (alpha == 0: both kept)
                lam_new = lam - alpha * (w - wb)
                wb_new = (1.0 - beta) * wb + (beta * w - beta_over_alpha * lam_new)
                lam = tl.where(alpha == 0.0, lam, lam_new)
                wb = tl.where(alpha == 0.0, wb, wb_new)
                tl.store(w_p + idx, w, mask=m)
                tl.store(wb_p + idx, wb, mask=m)
                tl.store(lam_p + idx, lam, mask=m)
            if start == 0:
                # The single increment of this tensor's step count. Every read of it
                # happened in phase 1, before the barrier: no race.
                step_p = tl.load(row + _C_STEP).to(tl.pointer_type(tl.float32))
                tl.store(step_p, step_before + 1.0)


@triton.jit
def _fptt_update_kernel(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, bar_ptr,
                        status_ptr, n_chunks, clip,
                        OPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        PBLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # ---- phase 1: per-chunk sum of squares of the regularised gradient (step 2) ----
    update_phase1(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, n_chunks, pid, nprog,
                  CHUNK, BLOCK)
    # ---- all partials written, all step counts read ----
    tl.debug_barrier()  # also orders the single-program case across its threads
    if nprog > 1:
        grid_barrier(bar_ptr, nprog)
    # ---- phase 2: global norm, identical in every program (fixed order); update ----
    update_phase2(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks,
                  clip, pid, nprog, OPT, CHUNK, BLOCK, PBLOCK)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

# (CHUNK, BLOCK, PBLOCK, num_warps). CHUNK is fixed per device type: with it the chunk
# boundaries, hence the partial sums and the norm, are fixed whatever the grid.
_GPU_CONFIG = (4096, 1024, 1024, 4)
_INTERP_CONFIG = (2048, 1024, 256, 1)
# Blocks per SM that are always co-resident with num_warps=4 (module docstring).
_BLOCKS_PER_SM = 2
_MAX_PLANS = 16

_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_SM_COUNT: dict = {}
plan_builds = 0  # how many tables were built (tests check the cache with it)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Plan:
    """Device tables and scratch of one set of tensors."""

    __slots__ = ("tables", "chunks", "partial", "chunk_step", "barrier", "n_chunks", "grid",
                 "config", "_host")

    def __init__(self, device, addr_rows, numels, group_of, grid_limit):
        chunk_size, block, pblock, num_warps = _config(device)
        chunk_rows = []
        for ti, n in enumerate(numels):
            # an empty tensor still gets one (empty) chunk: its owner advances its step
            # count, as the cpu and cuda backends and torch do
            for start in range(0, max(n, 1), chunk_size):
                chunk_rows.append((ti, start))
        self.n_chunks = len(chunk_rows)
        tab = torch.tensor([list(a) + [n, gi] for a, n, gi in zip(addr_rows, numels, group_of)],
                           dtype=torch.int64).reshape(-1)
        chk = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1)
        if device.type == "cuda":
            # Pinned + non_blocking: no host sync; keep the host copies alive (the copy
            # is queued on the stream and reads them later).
            tab, chk = tab.pin_memory(), chk.pin_memory()
            self._host = (tab, chk)
            self.tables = tab.to(device, non_blocking=True)
            self.chunks = chk.to(device, non_blocking=True)
        else:
            self._host = None
            self.tables, self.chunks = tab, chk
        self.partial = torch.empty(self.n_chunks, dtype=torch.float64, device=device)
        self.chunk_step = torch.empty(self.n_chunks, dtype=torch.float32, device=device)
        self.barrier = torch.zeros(2, dtype=torch.int32, device=device)
        if device.type == "cuda" and not _interpreted():
            cap = _BLOCKS_PER_SM * _sm_count(device)
        else:
            cap = 1  # interpreter: programs run one after another; no spinning barrier
        if grid_limit is not None:
            cap = max(1, min(cap, int(grid_limit)))
        self.grid = max(1, min(self.n_chunks, cap))
        self.config = (chunk_size, block, pblock, num_warps)


def _config(device):
    return _INTERP_CONFIG if device.type != "cuda" or _interpreted() else _GPU_CONFIG


def _sm_count(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check(s):
    """state (fptt_fast.seam.FpttState) as the kernel reads it; ValueError naming the field."""
    if s.optimizer not in (OPT_SGD, OPT_ADAM, OPT_ADAMW):
        raise ValueError(f"state.optimizer must be 0 (sgd), 1 (adam) or 2 (adamw), got "
                         f"{s.optimizer!r}")
    n = len(s.params)
    lists = {"grads": s.grads, "w_bar": s.w_bar, "lam": s.lam, "exp_avg": s.exp_avg,
             "step": s.step}
    if s.optimizer != OPT_SGD:
        lists["exp_avg_sq"] = s.exp_avg_sq
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"state.{name} has {len(lst)} tensors, state.params has {n}")
    if len(s.group_of) != n:
        raise ValueError(f"state.group_of has {len(s.group_of)} entries, state.params has {n}")
    dev = s.params[0].device
    if dev.type == "cuda" and _interpreted():
        raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) cannot run the fused "
                           "update on CUDA tensors (its pointer table holds device addresses)")
    hyper, status = s.hyper, s.status
    if not isinstance(hyper, torch.Tensor) or hyper.dtype != torch.float32 or hyper.dim() != 2 \
            or hyper.shape[1] != len(HYPER_FIELDS) or not hyper.is_contiguous() \
            or hyper.device != dev:
        raise ValueError(f"state.hyper must be a contiguous float32 [groups, {len(HYPER_FIELDS)}] "
                         f"tensor on {dev}, got {getattr(hyper, 'dtype', hyper)} "
                         f"{tuple(getattr(hyper, 'shape', ()))} on {getattr(hyper, 'device', None)}")
    if not isinstance(status, torch.Tensor) or status.dtype != torch.float32 \
            or status.numel() != 3 or not status.is_contiguous() or status.device != dev:
        raise ValueError(f"state.status must be a contiguous float32 [3] tensor on {dev}")
    for gi in s.group_of:
        if not 0 <= int(gi) < hyper.shape[0]:
            raise ValueError(f"group index {gi} out of range for {hyper.shape[0]} groups")
    for i, p in enumerate(s.params):
        for name, lst in lists.items():
            t = lst[i]
            want = 1 if name == "step" else p.numel()
            if t.dtype != torch.float32 or t.device != dev or not t.is_contiguous() \
                    or t.numel() != want:
                raise ValueError(f"state.{name}[{i}] must be a contiguous float32 tensor of "
                                 f"{want} elements on {dev}, got {t.dtype} {tuple(t.shape)} on "
                                 f"{t.device}")
        if p.dtype != torch.float32 or p.device != dev or not p.is_contiguous():
            raise ValueError(f"state.params[{i}] must be a contiguous float32 tensor on {dev}")


def fused_update(state, *, grid_limit=None) -> None:
    """docs/ALGORITHM.md steps 2-6 on every tensor of `state` (fptt_fast.seam.FpttState), in
    one kernel launch; see the module docstring.

    grid_limit (tests only): cap the number of programs below the co-residency cap, to
    exercise several chunks per program and the barrier with odd grid sizes.
    """
    if len(state.params) == 0:
        return
    plan = get_plan(state, grid_limit=grid_limit)
    chunk_size, block, pblock, num_warps = plan.config
    args = (plan.tables, plan.chunks, state.hyper, plan.partial, plan.chunk_step, plan.barrier,
            state.status, plan.n_chunks, float(state.clip))
    kw = dict(OPT=int(state.optimizer), CHUNK=chunk_size, BLOCK=block, PBLOCK=pblock,
              num_warps=num_warps)
    dev = state.params[0].device
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _fptt_update_kernel[(plan.grid,)](*args, **kw)
    else:
        _fptt_update_kernel[(plan.grid,)](*args, **kw)


def get_plan(state, *, grid_limit=None, tag=None) -> "_Plan":
    """The cached tables and scratch of one state's tensors (checked when first built).
    tag: a caller's name, so that another kernel (lstm_segment) gets its own plan."""
    params = state.params
    n = len(params)
    sgd = state.optimizer == OPT_SGD
    s2 = params if sgd else state.exp_avg_sq  # SGD never touches s2 (OPT is a constexpr)
    dev = params[0].device
    ptr_cols = (params, state.grads, state.w_bar, state.lam, state.exp_avg, s2, state.step)
    key = (tag, dev, state.optimizer, grid_limit, _config(dev),
           tuple(int(g) for g in state.group_of), tuple(p.numel() for p in params),
           tuple(t.data_ptr() for col in ptr_cols for t in col))
    plan = _PLANS.get(key)
    if plan is None:
        _check(state)
        global plan_builds
        addr_rows = [tuple(col[i].data_ptr() for col in ptr_cols) for i in range(n)]
        plan = _Plan(dev, addr_rows, [p.numel() for p in params],
                     [int(g) for g in state.group_of], grid_limit)
        plan_builds += 1
        _PLANS[key] = plan
        while len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan
