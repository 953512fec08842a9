"""What the general Triton segment kernels of every cell share (kernels/lstm_segment.py,
gru_segment.py): activations, GEMM and gradient tiles, the head and loss of a batch tile
and its gradient on h, the gradient and update phases after the per-tile recurrence, and
the host side's checks, placeholders and launch. Each cell's file holds its recurrence
(phase A: forward and backward of one batch tile) and its workspace. Contracts as
kernels/lstm_segment.py's: no float atomics, results independent of the grid.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from fptt_fast.layout import LOSS_CODE

from . import fptt_update as fu

MAX_HIDDEN = 2048
MAX_INPUT = 1 << 16
MAX_OUTPUT = 512
LOSS_MSE, LOSS_CE = LOSS_CODE["mse"], LOSS_CODE["ce"]  # fptt_fast/layout.py

# (BB batch rows, BH hidden block, BK reduction block, BR / BC gradient tile, num_warps)
_GPU_CONFIG = (16, 32, 32, 32, 32, 4)
_INTERP_CONFIG_MAX = (64, 64, 64, 64, 64, 1)  # interpreter: fewer, larger blocks


# ----------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh with exp only (no libdevice in the interpreter); accurate near 0 too.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _loss_tile(logits, tgt_ptr, trow, rows, rm, ocols, om, B, O, dscale, LOSS: tl.constexpr):
    """The task loss of one [rows, O] tile of logits at target row trow (MSE: targets
    [.., B, O] floats; CE: [.., B] class indices): (the loss summed over the tile's rows,
    dP = d(dscale * that sum)/d logits). Shared by the general and the persistent kernel;
    the CPU and CUDA kernels have theirs in lstm_math.h, all tested against the reference."""
    m2 = rm[:, None] & om[None, :]
    if LOSS == 0:
        y = tl.load(tgt_ptr + trow * B * O + rows[:, None] * O + ocols[None, :], mask=m2,
                    other=0.0)
        diff = tl.where(m2, logits - y, 0.0)
        lsum = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        dp = (2.0 * dscale) * diff
    else:
        y = tl.load(tgt_ptr + trow * B + rows, mask=rm, other=0).to(tl.int32)
        z = tl.where(om[None, :], logits, float("-inf"))
        mx = tl.max(z, axis=1)
        e = tl.where(om[None, :], tl.exp(z - mx[:, None]), 0.0)
        se = tl.sum(e, axis=1)
        onehot = ocols[None, :] == y[:, None]
        picked = tl.sum(tl.where(onehot, z, 0.0), axis=1)
        # a class index out of [0, O) poisons its row with NaN, as the CUDA kernel does:
        # the update sees a non-finite norm and skips (no host sync to check)
        bad = (y < 0) | (y >= O)
        lrow = tl.where(bad, float("nan"), mx + tl.log(se) - picked)
        lsum = tl.sum(tl.where(rm, lrow, 0.0), axis=0)
        dp = dscale * (e / se[:, None] - tl.where(onehot, 1.0, 0.0))
        dp = tl.where(m2, tl.where(bad[:, None], float("nan"), dp), 0.0)
    return lsum, dp


@triton.jit
def _gate_acc(acc, a_ptr, a_stride, rows, rmask, w_ptr, w_stride, wrow0, cols, cmask, K,
              BK: tl.constexpr, PREC: tl.constexpr):
    """acc[BB, BH] += A[rows, :K] @ W[wrow0 + cols, :K]^T  (A, W row-major)."""
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        a = tl.load(a_ptr + rows[:, None] * a_stride + kk[None, :],
                    mask=rmask[:, None] & km[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + (wrow0 + cols)[None, :] * w_stride + kk[:, None],
                    mask=cmask[None, :] & km[:, None], other=0.0)
        acc += tl.dot(a, w, input_precision=PREC)
    return acc


@triton.jit
def _head_and_loss(hs_ptr, wo_ptr, bo_ptr, tgt_ptr, dp_ptr, rows, rm, ocols, om, T, B, H, O,
                   dscale, LOSS: tl.constexpr, PER_STEP: tl.constexpr, BB: tl.constexpr,
                   BK: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr):
    """The head on the batch tile's hidden states (hs [T+1, B, H]: the last step's, or
    every step's with PER_STEP), the loss summed over its rows (returned) and
    dP = d(dscale * loss)/d logits into dp [TP, B, O]."""
    BH_ = B * H
    bo = tl.load(bo_ptr + ocols, mask=om, other=0.0)
    lsum = tl.sum(tl.zeros([BB], dtype=tl.float32), axis=0)
    if PER_STEP:
        t_first = 0
    else:
        t_first = T - 1
    for t in range(t_first, T):
        tp = t - t_first  # row of the target and of dP
        logits = _gate_acc(tl.zeros([BB, OP], dtype=tl.float32), hs_ptr + (t + 1) * BH_, H,
                           rows, rm, wo_ptr, H, 0, ocols, om, H, BK, PREC) + bo[None, :]
        m2 = rm[:, None] & om[None, :]
        l_t, dp = _loss_tile(logits, tgt_ptr, tp, rows, rm, ocols, om, B, O, dscale, LOSS)
        lsum += l_t
        tl.store(dp_ptr + tp * B * O + rows[:, None] * O + ocols[None, :], dp, mask=m2)
    return lsum


@triton.jit
def _tile_loss(hs_ptr, wo_ptr, bo_ptr, tgt_ptr, dp_ptr, lpart_ptr, tile, rows, rm, T, B, H, O,
               dscale, LOSS: tl.constexpr, PER_STEP: tl.constexpr, HEAD: tl.constexpr,
               FWD_ONLY: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, OP: tl.constexpr,
               PREC: tl.constexpr):
    """The batch tile's loss into lpart[tile] (0 for a layer without the head, or the
    forward alone), dP into dp (_head_and_loss)."""
    ocols = tl.arange(0, OP)
    om = ocols < O
    lsum = tl.sum(tl.zeros([BB], dtype=tl.float32), axis=0)
    if HEAD and not FWD_ONLY:
        lsum = _head_and_loss(hs_ptr, wo_ptr, bo_ptr, tgt_ptr, dp_ptr, rows, rm, ocols, om, T,
                              B, H, O, dscale, LOSS, PER_STEP, BB, BK, OP, PREC)
    tl.store(lpart_ptr + tile, lsum)


@triton.jit
def _zero_tile(ptr, rows, rm, H, BB: tl.constexpr, BH: tl.constexpr):
    """ptr[rows, :H] = 0 ([B, H] row-major)."""
    for j0 in range(0, H, BH):
        cols = j0 + tl.arange(0, BH)
        tl.store(ptr + rows[:, None] * H + cols[None, :], tl.zeros([BB, BH], dtype=tl.float32),
                 mask=rm[:, None] & (cols < H)[None, :])


@triton.jit
def _dh_block(j0, dh_ptr, dhseq_ptr, dp_ptr, wo_ptr, t, T, rows, rm, ocols, om, B, H, O,
              BH: tl.constexpr, HEAD: tl.constexpr, PER_STEP: tl.constexpr, PREC: tl.constexpr):
    """The backward's view of hidden columns j0 .. j0+BH at step t: (cols, their mask, the
    tile's mask, its offsets in a [B, H] array, and the total gradient on h_t there: the
    recurrent part in dh plus _grad_from_above's)."""
    cols = j0 + tl.arange(0, BH)
    cm = cols < H
    m2 = rm[:, None] & cm[None, :]
    off = rows[:, None] * H + cols[None, :]
    dh = tl.load(dh_ptr + off, mask=m2, other=0.0, cache_modifier=".cg")
    dh = _grad_from_above(dh, dhseq_ptr, dp_ptr, wo_ptr, t, T, rows, rm, cols, cm, ocols, om, B,
                          H, O, HEAD, PER_STEP, PREC)
    return cols, cm, m2, off, dh


@triton.jit
def _grad_from_above(dh, dhseq_ptr, dp_ptr, wo_ptr, t, T, rows, rm, cols, cm, ocols, om, B, H,
                     O, HEAD: tl.constexpr, PER_STEP: tl.constexpr, PREC: tl.constexpr):
    """dh [BB, BH] plus the gradient on step t's h from outside the recurrence: the head's
    (dP_t W_o: every step with PER_STEP, else the last) or, for a lower layer of a stack
    (HEAD False), dh_seq[t] from the layer above."""
    m2 = rm[:, None] & cm[None, :]
    if not HEAD:
        dh += tl.load(dhseq_ptr + t * B * H + rows[:, None] * H + cols[None, :], mask=m2,
                      other=0.0)
    else:
        if PER_STEP:
            tp = t
            has_head = t >= 0
        else:
            tp = 0
            has_head = t == T - 1
        if has_head:
            dpt = tl.load(dp_ptr + tp * B * O + rows[:, None] * O + ocols[None, :],
                          mask=rm[:, None] & om[None, :], other=0.0, cache_modifier=".cg")
            wo = tl.load(wo_ptr + ocols[:, None] * H + cols[None, :],
                         mask=om[:, None] & cm[None, :], other=0.0)
            dh += tl.dot(dpt, wo, input_precision=PREC)
    return dh


@triton.jit
def _grad_tile(a_ptr, a_tstride, a_cols, r0, b_ptr, b_tstride, b_cols, c0, out_ptr, T, B,
               BB: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """out[r0:r0+BR, c0:c0+BC] = sum_t A_t^T B_t, A_t [B, a_cols] at a_ptr + t*a_tstride,
    B_t [B, b_cols] at b_ptr + t*b_tstride; out is [a_cols, b_cols] row-major. The sum
    runs over t, then over batch tiles, in this fixed order."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    rmask = r < a_cols
    cmask = c < b_cols
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for t in range(0, T):
        for b0 in range(0, B, BB):
            bb = b0 + tl.arange(0, BB)
            bm = bb < B
            a = tl.load(a_ptr + t * a_tstride + bb[None, :] * a_cols + r[:, None],
                        mask=rmask[:, None] & bm[None, :], other=0.0, cache_modifier=".cg")
            b = tl.load(b_ptr + t * b_tstride + bb[:, None] * b_cols + c[None, :],
                        mask=bm[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
            acc += tl.dot(a, b, input_precision=PREC)
    tl.store(out_ptr + r[:, None] * b_cols + c[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dx_tile(dg_ptr, w_ptr, out_ptr, r0, c0, TB, G, I, BR: tl.constexpr, BC: tl.constexpr,
             BK: tl.constexpr, PREC: tl.constexpr):
    """out[r0:r0+BR, c0:c0+BC] = dG [TB, G] @ W_ih [G, I]: the gradient on a stacked
    layer's input (summed over G in order)."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    rmask = r < TB
    cmask = c < I
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for k0 in range(0, G, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < G
        a = tl.load(dg_ptr + r[:, None] * G + kk[None, :], mask=rmask[:, None] & km[None, :],
                    other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + kk[:, None] * I + c[None, :], mask=km[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(a, w, input_precision=PREC)
    tl.store(out_ptr + r[:, None] * I + c[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _bias_tile(a_ptr, a_cols, r0, out_ptr, out2_ptr, TB, BB: tl.constexpr, BR: tl.constexpr):
    """out[r0:r0+BR] = sum over the TB rows of A [TB, a_cols] (fixed order); the same
    into out2 (which may be out)."""
    r = r0 + tl.arange(0, BR)
    rmask = r < a_cols
    acc = tl.zeros([BR], dtype=tl.float32)
    for b0 in range(0, TB, BB):
        bb = b0 + tl.arange(0, BB)
        a = tl.load(a_ptr + bb[:, None] * a_cols + r[None, :],
                    mask=(bb < TB)[:, None] & rmask[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(a, axis=0)
    tl.store(out_ptr + r, acc, mask=rmask)
    tl.store(out2_ptr + r, acc, mask=rmask)


@triton.jit
def _gradients_and_update(
        pid, nprog, dgx_ptr, dgh_ptr, x_ptr, hs_ptr, dp_ptr, wih_ptr, gwih_ptr, gwhh_ptr,
        gbih_ptr, gbhh_ptr, gwo_ptr, gbo_ptr, dx_ptr, lpart_ptr, loss_ptr, bar_ptr,
        tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks, clip,
        T, B, I, H, O, G, n_btiles, lscale,
        PER_STEP: tl.constexpr, OPT: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
        BR: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK: tl.constexpr, PBLOCK: tl.constexpr, UPDATE: tl.constexpr, HEAD: tl.constexpr,
        FWD_ONLY: tl.constexpr, DX: tl.constexpr, SAME_DG: tl.constexpr):
    """Phases B and C, after phase A and a grid barrier: the gradients, tile by tile
    (weight_ih = dGx^T x, weight_hh = dGh^T h_{t-1}, the head's, the biases as column sums
    of dGx and dGh, a stacked layer's dx = dGx W_ih; dGx, dGh [T, B, G] are the gradients
    on the input and recurrent projections, one buffer (SAME_DG) for a cell where they
    are equal),
    the loss, then the FPTT update (kernels/fptt_update.py's phases) if UPDATE. Without
    the update the launch ends with the gradients: no barrier needed."""
    if PER_STEP:
        TP = T
    else:
        TP = 1
    n_rg = tl.cdiv(G, BR)
    if HEAD:
        n_ro = tl.cdiv(O, BR)
    else:
        n_ro = 0
    n_ci = tl.cdiv(I, BC)
    n_ch = tl.cdiv(H, BC)
    e1 = n_rg * n_ci          # weight_ih tiles
    e2 = e1 + n_rg * n_ch     # weight_hh tiles
    e3 = e2 + n_ro * n_ch     # head.weight tiles
    e4 = e3 + n_rg            # bias_ih and bias_hh tiles
    e5 = e4 + n_ro            # head.bias tiles
    if DX:
        e6 = e5 + tl.cdiv(T * B, BR) * n_ci  # dx tiles: dGx W_ih
    else:
        e6 = e5
    if FWD_ONLY:
        e6 = 0
    for k in range(pid, e6, nprog):
        if k < e1:
            r0 = (k // n_ci) * BR
            c0 = (k % n_ci) * BC
            _grad_tile(dgx_ptr, B * G, G, r0, x_ptr, B * I, I, c0, gwih_ptr, T, B,
                       BB, BR, BC, PREC)
        elif k < e2:
            kk = k - e1
            r0 = (kk // n_ch) * BR
            c0 = (kk % n_ch) * BC
            _grad_tile(dgh_ptr, B * G, G, r0, hs_ptr, B * H, H, c0, gwhh_ptr, T, B,
                       BB, BR, BC, PREC)
        elif k < e3:
            kk = k - e2
            r0 = (kk // n_ch) * BR
            c0 = (kk % n_ch) * BC
            # dP_t pairs with h_t = hs[t + 1] (terminal: the one dP with h_{T-1} = hs[T])
            _grad_tile(dp_ptr, B * O, O, r0, hs_ptr + (T - TP + 1) * B * H, B * H, H, c0,
                       gwo_ptr, TP, B, BB, BR, BC, PREC)
        elif k < e4:
            if SAME_DG:  # one gradient on both projections (the LSTM): one sum, both biases
                _bias_tile(dgx_ptr, G, (k - e3) * BR, gbih_ptr, gbhh_ptr, T * B, BB, BR)
            else:
                _bias_tile(dgx_ptr, G, (k - e3) * BR, gbih_ptr, gbih_ptr, T * B, BB, BR)
                _bias_tile(dgh_ptr, G, (k - e3) * BR, gbhh_ptr, gbhh_ptr, T * B, BB, BR)
        elif k < e5:
            _bias_tile(dp_ptr, O, (k - e4) * BR, gbo_ptr, gbo_ptr, TP * B, BB, BR)
        else:
            kk = k - e5
            _dx_tile(dgx_ptr, wih_ptr, dx_ptr, (kk // n_ci) * BR, (kk % n_ci) * BC, T * B, G,
                     I, BR, BC, BK, PREC)
    if pid == 0:
        total = tl.load(lpart_ptr, cache_modifier=".cg")
        for i in range(1, n_btiles):
            total += tl.load(lpart_ptr + i, cache_modifier=".cg")
        tl.store(loss_ptr, total * lscale)
    if UPDATE:
        tl.debug_barrier()
        if nprog > 1:
            fu.grid_barrier(bar_ptr, nprog)
        fu.update_phase1(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, n_chunks, pid,
                         nprog, CHUNK, BLOCK)
        tl.debug_barrier()
        if nprog > 1:
            fu.grid_barrier(bar_ptr, nprog)
        fu.update_phase2(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr,
                         n_chunks, clip, pid, nprog, OPT, CHUNK, BLOCK, PBLOCK)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _p2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def _config(device, B, H, I, G):
    """(BB, BH, BK, BR, BC, num_warps) for G = gates * H rows per weight."""
    if device.type == "cuda" and not _interpreted():
        return _GPU_CONFIG
    bbm, bhm, bkm, brm, bcm, nw = _INTERP_CONFIG_MAX
    return (_p2(B, 16, bbm), _p2(H, 16, bhm), _p2(max(H, I), 16, bkm), _p2(G, 16, brm),
            _p2(max(H, I), 16, bcm), nw)


def cached(cache, key, make, limit=8):
    """cache[key] (an OrderedDict), made by make() on a miss; the least recently used
    entries beyond `limit` are dropped (the kernels' workspaces, per shape)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        while len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _check_tensor(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device \
            or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def prepare(state, segment, config, gates, cell_state, tag, limits):
    """Check one general-kernel launch of a cell with `gates` gate blocks (G = gates * H
    rows per weight; cell_state: it has c) and return what every cell's launch passes:
    sizes, the tensors (placeholders where a stacked layer or a cell has none: never read),
    the update's tables (or placeholders without the update), the blocks, the constexprs
    and the work. limits: the calling kernel's (MAX_HIDDEN, MAX_INPUT, MAX_OUTPUT).
    Raises ValueError (TypeError for a non-tensor) naming the argument."""
    max_hidden, max_input, max_output = limits
    x, target, h0, c0 = segment.x, segment.target, segment.h0, segment.c0
    h_out, c_out, loss_out = segment.h_out, segment.c_out, segment.losses
    params, grads = state.params, state.grads
    loss, weight = config.loss, config.weight
    if config.n_segs != 1:
        raise ValueError(f"the general Triton kernel runs one segment per launch, got "
                         f"config.n_segs={config.n_segs}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    T, B, I = x.shape
    head, fwd_only = bool(config.head), bool(config.forward_only)
    n_params = 6 if head else 4
    if len(params) != n_params or len(grads) != n_params:
        raise ValueError("params and grads must hold the 6 cell + head tensors" if head else
                         "without the head (config.head False) params and grads must hold a "
                         "layer's 4 tensors")
    if config.update and (not head or fwd_only):
        raise ValueError("config.update needs the head and the backward (the layers of a "
                         "stack are updated together, by the optimiser)")
    H = params[1].shape[1] if params[1].dim() == 2 else -1
    G = gates * H
    if head:
        O = params[4].shape[0] if params[4].dim() == 2 else -1
    else:
        O = 1  # sizes the unused head scratch
    dev = x.device
    if T < 1 or B < 1 or I < 1 or H < 1 or O < 1:
        raise ValueError(f"empty sizes: T={T}, B={B}, I={I}, H={H}, O={O}")
    if H > max_hidden:
        raise ValueError(f"hidden size {H} exceeds the Triton segment kernel's limit "
                         f"MAX_HIDDEN={max_hidden}")
    if I > max_input:
        raise ValueError(f"input size {I} exceeds MAX_INPUT={max_input}")
    if O > max_output:
        raise ValueError(f"output size {O} exceeds MAX_OUTPUT={max_output} (the head's "
                         "logits row is held in registers)")
    if max(T * B * G, T * B * I, G * max(H, I)) >= 2 ** 31:
        raise ValueError(f"segment too large for the kernel's int32 offsets: T*B*G = "
                         f"{T * B * G}, T*B*I = {T * B * I}")
    if loss not in (LOSS_MSE, LOSS_CE):
        raise ValueError(f"loss must be 0 (mse) or 1 (ce), got {loss!r}")
    if dev.type == "cuda" and _interpreted():
        raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) cannot run on CUDA tensors")
    f32 = torch.float32
    _check_tensor("x", x, (T, B, I), f32, dev)
    per_step = bool(config.per_step) and head  # a layer without the head has no loss
    lead = (T, B) if per_step else (B,)
    if not head or fwd_only:
        if not head and target is not None:
            raise ValueError("segment.target must be None without the head (config.head False)")
        target = x  # not read
    elif loss == LOSS_MSE:
        _check_tensor("target", target, lead + (O,), f32, dev)
    else:
        _check_tensor("target", target, lead, torch.int64, dev)
    want_dh = not head and not fwd_only
    if (segment.dh_seq is not None) != want_dh:
        raise ValueError("a layer without the head takes the gradient on its outputs, "
                         "segment.dh_seq [T, B, H]" if want_dh else
                         "segment.dh_seq is read only by a layer without the head running "
                         "its backward; pass None")
    if want_dh:
        _check_tensor("dh_seq", segment.dh_seq, (T, B, H), f32, dev)
    if segment.dx is not None:
        if fwd_only:
            raise ValueError("segment.dx is a gradient, and config.forward_only computes none")
        _check_tensor("dx", segment.dx, (T, B, I), f32, dev)
    if segment.h_seq is not None:
        _check_tensor("h_seq", segment.h_seq, (T, B, H), f32, dev)
    shapes = [(G, I), (G, H), (G,), (G,), (O, H), (O,)][:n_params]
    for i, s in enumerate(shapes):
        _check_tensor(f"params[{i}]", params[i], s, f32, dev)
        _check_tensor(f"grads[{i}]", grads[i], s, f32, dev)
    states = (("h0", h0), ("h_out", h_out))
    if cell_state:
        states += (("c0", c0), ("c_out", c_out))
    elif c0 is not None or c_out is not None:
        raise ValueError("segment.c0 and c_out must be None (this cell has no cell state)")
    else:
        c0 = c_out = x  # not read
    for name, t in states:
        _check_tensor(name, t, (B, H), f32, dev)
    if not isinstance(loss_out, torch.Tensor) or loss_out.numel() != 1 \
            or loss_out.dtype != f32 or loss_out.device != dev:
        raise ValueError(f"segment.losses must be a one-element float32 tensor on {dev}")

    if config.update:
        plan = fu.get_plan(state, tag=tag)
        chunk_size, block, pblock, _ = plan.config
        update_args = (plan.tables, plan.chunks, state.hyper, plan.partial, plan.chunk_step,
                       state.status, plan.n_chunks, float(state.clip))
        n_chunks = plan.n_chunks
    else:  # the update phase is compiled out: placeholders, never read
        chunk_size, block, pblock, n_chunks = 16, 16, 16, 0
        update_args = (x, x, x, x, x, x, 0, 0.0)
    BB, BH, BK, BR, BC, num_warps = _config(dev, B, H, I, G)
    OP = _p2(O, 16, max_output)
    n_btiles = triton.cdiv(B, BB)
    n_grad_tiles = (triton.cdiv(G, BR) * (triton.cdiv(I, BC) + triton.cdiv(H, BC) + 1)
                    + triton.cdiv(O, BR) * (triton.cdiv(H, BC) + 1)
                    + (triton.cdiv(T * B, BR) * triton.cdiv(I, BC) if segment.dx is not None else 0))
    n_terms = (T if per_step else 1) * B * (O if loss == LOSS_MSE else 1)
    head_params = (params[4], params[5], grads[4], grads[5]) if head else (x, x, x, x)
    kw = dict(LOSS=int(loss), PER_STEP=per_step, OPT=int(state.optimizer), BB=BB, BH=BH,
              BK=BK, BR=BR, BC=BC, OP=OP, PREC="tf32" if config.tf32 else "ieee",
              CHUNK=chunk_size, BLOCK=block, PBLOCK=pblock, UPDATE=bool(config.update),
              HEAD=head, FWD_ONLY=fwd_only, DX=segment.dx is not None,
              HSEQ=segment.h_seq is not None, num_warps=num_warps)
    return SimpleNamespace(
        x=x, target=target, h0=h0, c0=c0, h_out=h_out, c_out=c_out, loss_out=loss_out,
        params=[*params[:4], *head_params[:2]], grads=[*grads[:4], *head_params[2:]],
        layer_io=tuple(t if t is not None else x
                       for t in (segment.dh_seq, segment.dx, segment.h_seq)),
        update_args=update_args, dev=dev, T=T, B=B, I=I, H=H, O=O, per_step=per_step,
        n_btiles=n_btiles, lscale=1.0 / n_terms, dscale=float(weight) / n_terms, kw=kw,
        work=max(n_btiles, n_grad_tiles, n_chunks))


def launch(kernel, caps, what, c, args, grid_limit=None) -> None:
    """kernel(*args, **c.kw) on a grid of at most the co-resident programs (the grid
    barriers spin), capped by grid_limit (tests); one program in the interpreter."""
    if c.dev.type == "cuda":
        with torch.cuda.device(c.dev):
            cap = co_resident_cap(kernel, caps, c.dev, (c.T, c.B, c.I, c.H, c.O), args, c.kw,
                                  what)
            if grid_limit is not None:
                cap = max(1, min(cap, int(grid_limit)))
            kernel[(max(1, min(cap, c.work)),)](*args, **c.kw)
    else:
        kernel[(1,)](*args, **c.kw)  # interpreter: one program, no barrier

def co_resident_cap(kernel, caps, dev, sizes, args, kw, what) -> int:
    """Programs of `kernel` surely resident at once on `dev`: at most fptt_update's 2
    blocks per SM, fewer if the compiled kernel's registers, shared memory or threads say
    so. Compiled (not launched) once per shape and config and cached in `caps`. Shared by
    the kernels whose programs wait on each other (this one's grid barriers,
    lstm_persistent's group syncs)."""
    key = (dev.index, sizes, tuple(sorted(kw.items())))
    cap = caps.get(key)
    if cap is None:
        k = kernel.warmup(*args, grid=(1,), **kw)
        if hasattr(k, "_init_handles"):
            k._init_handles()  # loads the binary; sets n_regs
        n_regs = int(getattr(k, "n_regs", 0) or 255)  # unknown: the per-thread maximum
        props = torch.cuda.get_device_properties(dev)
        num_warps = kw["num_warps"]
        # registers are allocated per warp in units of 256
        regs_block = num_warps * (-(-n_regs * 32 // 256) * 256)
        regs_sm = int(getattr(props, "regs_per_multiprocessor", 65536) or 65536)
        smem_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 0)
        if smem_sm == 0:
            smem_sm = triton.runtime.driver.active.utils.get_device_properties(
                dev.index if dev.index is not None else torch.cuda.current_device())["max_shared_mem"]
        shared = int(k.metadata.shared) + 1024  # + the per-block reservation (sm_80+)
        threads_sm = int(getattr(props, "max_threads_per_multi_processor", 2048) or 2048)
        per_sm = min(fu._BLOCKS_PER_SM, regs_sm // max(1, regs_block), smem_sm // shared,
                     threads_sm // (32 * num_warps))
        if per_sm < 1:
            raise RuntimeError(f"{what} does not fit one SM (registers {n_regs}/thread, "
                               f"shared memory {k.metadata.shared} B)")
        cap = per_sm * fu._sm_count(dev)
        caps[key] = cap
    return cap
