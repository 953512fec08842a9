"""One FPTT segment of an LSTM + linear head as ONE Triton kernel launch.

Called by fptt_fast.FPTTLSTM for backend="triton" as train_segment(state, segment, config)
(fptt_fast.seam's FpttState, SegmentIO, SegmentConfig; its docstring gives every shape).
Phases: forward, loss and backward per batch tile | the six gradients | the update of
kernels/fptt_update.py (not with config.update False: data-parallel training all-reduces
the gradients first). Contracts: no float atomics, bitwise reproducible for any grid;
H <= MAX_HIDDEN, O <= MAX_OUTPUT; launches sharing a workspace must be stream-ordered.
Design: docs/KERNELS.md#kernelslstm_segmentpy
"""
from __future__ import annotations

import os
from collections import OrderedDict

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
_MAX_WORKSPACES = 8
_WORKSPACES: "OrderedDict[tuple, dict]" = OrderedDict()


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
def _bias_pair(bih_ptr, bhh_ptr, off, cols, cm):
    return (tl.load(bih_ptr + off + cols, mask=cm, other=0.0)
            + tl.load(bhh_ptr + off + cols, mask=cm, other=0.0))


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
def _batch_tile_forward_backward(
        x_ptr, tgt_ptr, h0_ptr, c0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
        hout_ptr, cout_ptr, hs_ptr, cs_ptr, gates_ptr, dg_ptr, dp_ptr, dh_ptr, dc_ptr,
        lpart_ptr, dhseq_ptr, hseq_ptr, tile, T, B, I, H, O, dscale,
        LOSS: tl.constexpr, PER_STEP: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
        BK: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr, HEAD: tl.constexpr,
        FWD_ONLY: tl.constexpr, HSEQ: tl.constexpr):
    """Phase A for the batch rows tile*BB ... tile*BB + BB - 1. A lower layer of a stack
    (HEAD False) has no head and no loss: the gradient on its outputs is dh_seq."""
    rows = tile * BB + tl.arange(0, BB)
    rm = rows < B
    H4 = 4 * H
    BH_ = B * H
    # ---- (h0, c0) -> hs[0], cs[0] ----
    for j0 in range(0, H, BH):
        cols = j0 + tl.arange(0, BH)
        m2 = rm[:, None] & (cols < H)[None, :]
        off = rows[:, None] * H + cols[None, :]
        tl.store(hs_ptr + off, tl.load(h0_ptr + off, mask=m2, other=0.0), mask=m2)
        tl.store(cs_ptr + off, tl.load(c0_ptr + off, mask=m2, other=0.0), mask=m2)
    tl.debug_barrier()

    # ---- forward ----
    for t in range(0, T):
        x_t = x_ptr + t * B * I
        h_prev = hs_ptr + t * BH_
        for j0 in range(0, H, BH):
            cols = j0 + tl.arange(0, BH)
            cm = cols < H
            m2 = rm[:, None] & cm[None, :]
            acc_i = tl.zeros([BB, BH], dtype=tl.float32)
            acc_f = tl.zeros([BB, BH], dtype=tl.float32)
            acc_g = tl.zeros([BB, BH], dtype=tl.float32)
            acc_o = tl.zeros([BB, BH], dtype=tl.float32)
            acc_i = _gate_acc(acc_i, x_t, I, rows, rm, wih_ptr, I, 0 * H, cols, cm, I, BK, PREC)
            acc_f = _gate_acc(acc_f, x_t, I, rows, rm, wih_ptr, I, 1 * H, cols, cm, I, BK, PREC)
            acc_g = _gate_acc(acc_g, x_t, I, rows, rm, wih_ptr, I, 2 * H, cols, cm, I, BK, PREC)
            acc_o = _gate_acc(acc_o, x_t, I, rows, rm, wih_ptr, I, 3 * H, cols, cm, I, BK, PREC)
            acc_i = _gate_acc(acc_i, h_prev, H, rows, rm, whh_ptr, H, 0 * H, cols, cm, H, BK, PREC)
            acc_f = _gate_acc(acc_f, h_prev, H, rows, rm, whh_ptr, H, 1 * H, cols, cm, H, BK, PREC)
            acc_g = _gate_acc(acc_g, h_prev, H, rows, rm, whh_ptr, H, 2 * H, cols, cm, H, BK, PREC)
            acc_o = _gate_acc(acc_o, h_prev, H, rows, rm, whh_ptr, H, 3 * H, cols, cm, H, BK, PREC)
            b_i = _bias_pair(bih_ptr, bhh_ptr, 0 * H, cols, cm)
            b_f = _bias_pair(bih_ptr, bhh_ptr, 1 * H, cols, cm)
            b_g = _bias_pair(bih_ptr, bhh_ptr, 2 * H, cols, cm)
            b_o = _bias_pair(bih_ptr, bhh_ptr, 3 * H, cols, cm)
            gi = _sigmoid(acc_i + b_i[None, :])
            gf = _sigmoid(acc_f + b_f[None, :])
            gg = _tanh(acc_g + b_g[None, :])
            go = _sigmoid(acc_o + b_o[None, :])
            off = rows[:, None] * H + cols[None, :]
            c_prev = tl.load(cs_ptr + t * BH_ + off, mask=m2, other=0.0, cache_modifier=".cg")
            c_new = gf * c_prev + gi * gg
            h_new = go * _tanh(c_new)
            tl.store(cs_ptr + (t + 1) * BH_ + off, c_new, mask=m2)
            tl.store(hs_ptr + (t + 1) * BH_ + off, h_new, mask=m2)
            if HSEQ:
                tl.store(hseq_ptr + t * BH_ + off, h_new, mask=m2)
            m_last = m2 & ((rows * 0 + t) == T - 1)[:, None]  # a tensor mask (interpreter)
            tl.store(hout_ptr + off, h_new, mask=m_last)
            tl.store(cout_ptr + off, c_new, mask=m_last)
            goff = t * B * H4 + rows[:, None] * H4 + cols[None, :]
            tl.store(gates_ptr + goff, gi, mask=m2)
            tl.store(gates_ptr + goff + H, gf, mask=m2)
            tl.store(gates_ptr + goff + 2 * H, gg, mask=m2)
            tl.store(gates_ptr + goff + 3 * H, go, mask=m2)
        tl.debug_barrier()  # h_t of every column before the next step reads it

    # ---- head and loss: on the last state (terminal) or on every step ----
    ocols = tl.arange(0, OP)
    om = ocols < O
    lsum = tl.sum(tl.zeros([BB], dtype=tl.float32), axis=0)
    if HEAD and not FWD_ONLY:
        bo = tl.load(bo_ptr + ocols, mask=om, other=0.0)
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
    tl.store(lpart_ptr + tile, lsum)

    # ---- backward through the segment (truncated at its start) ----
    if not FWD_ONLY:
        for j0 in range(0, H, BH):
            cols = j0 + tl.arange(0, BH)
            m2 = rm[:, None] & (cols < H)[None, :]
            off = rows[:, None] * H + cols[None, :]
            zero = tl.zeros([BB, BH], dtype=tl.float32)
            tl.store(dh_ptr + off, zero, mask=m2)
            tl.store(dc_ptr + (T % 2) * BH_ + off, zero, mask=m2)
        tl.debug_barrier()
        for s in range(0, T):
            t = T - 1 - s
            # pass 1: dG_t and the gradient carried to c_{t-1}
            for j0 in range(0, H, BH):
                cols = j0 + tl.arange(0, BH)
                cm = cols < H
                m2 = rm[:, None] & cm[None, :]
                off = rows[:, None] * H + cols[None, :]
                dh = tl.load(dh_ptr + off, mask=m2, other=0.0, cache_modifier=".cg")
                if PER_STEP:
                    tp = t
                    has_head = t >= 0
                else:
                    tp = 0
                    has_head = t == T - 1
                if not HEAD:  # the gradient from the layer above
                    dh += tl.load(dhseq_ptr + t * BH_ + off, mask=m2, other=0.0)
                elif has_head:
                    dpt = tl.load(dp_ptr + tp * B * O + rows[:, None] * O + ocols[None, :],
                                  mask=rm[:, None] & om[None, :], other=0.0, cache_modifier=".cg")
                    wo = tl.load(wo_ptr + ocols[:, None] * H + cols[None, :],
                                 mask=om[:, None] & cm[None, :], other=0.0)
                    dh += tl.dot(dpt, wo, input_precision=PREC)
                goff = t * B * H4 + rows[:, None] * H4 + cols[None, :]
                gi = tl.load(gates_ptr + goff, mask=m2, other=0.0, cache_modifier=".cg")
                gf = tl.load(gates_ptr + goff + H, mask=m2, other=0.0, cache_modifier=".cg")
                gg = tl.load(gates_ptr + goff + 2 * H, mask=m2, other=0.0, cache_modifier=".cg")
                go = tl.load(gates_ptr + goff + 3 * H, mask=m2, other=0.0, cache_modifier=".cg")
                c_t = tl.load(cs_ptr + (t + 1) * BH_ + off, mask=m2, other=0.0, cache_modifier=".cg")
                c_prev = tl.load(cs_ptr + t * BH_ + off, mask=m2, other=0.0, cache_modifier=".cg")
                dc_next = tl.load(dc_ptr + ((t + 1) % 2) * BH_ + off, mask=m2, other=0.0,
                                  cache_modifier=".cg")
                tc = _tanh(c_t)
                dc = dc_next + dh * go * (1.0 - tc * tc)
                tl.store(dg_ptr + goff, dc * gg * gi * (1.0 - gi), mask=m2)
                tl.store(dg_ptr + goff + H, dc * c_prev * gf * (1.0 - gf), mask=m2)
                tl.store(dg_ptr + goff + 2 * H, dc * gi * (1.0 - gg * gg), mask=m2)
                tl.store(dg_ptr + goff + 3 * H, dh * tc * go * (1.0 - go), mask=m2)
                tl.store(dc_ptr + (t % 2) * BH_ + off, dc * gf, mask=m2)
            tl.debug_barrier()
            # pass 2: dh_{t-1} = dG_t @ W_hh (not needed before the segment's start)
            if t > 0:
                for j0 in range(0, H, BH):
                    cols = j0 + tl.arange(0, BH)
                    cm = cols < H
                    acc = tl.zeros([BB, BH], dtype=tl.float32)
                    for k0 in range(0, H4, BK):
                        kk = k0 + tl.arange(0, BK)
                        km = kk < H4
                        a = tl.load(dg_ptr + t * B * H4 + rows[:, None] * H4 + kk[None, :],
                                    mask=rm[:, None] & km[None, :], other=0.0, cache_modifier=".cg")
                        w = tl.load(whh_ptr + kk[:, None] * H + cols[None, :],
                                    mask=km[:, None] & cm[None, :], other=0.0)
                        acc += tl.dot(a, w, input_precision=PREC)
                    tl.store(dh_ptr + rows[:, None] * H + cols[None, :], acc,
                             mask=rm[:, None] & cm[None, :])
                tl.debug_barrier()


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
    """out[r0:r0+BR] = sum over the TB rows of A [TB, a_cols] (fixed order); also to out2
    when TWO."""
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
def _lstm_segment_kernel(
        x_ptr, tgt_ptr, h0_ptr, c0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
        gwih_ptr, gwhh_ptr, gbih_ptr, gbhh_ptr, gwo_ptr, gbo_ptr,
        hout_ptr, cout_ptr, loss_ptr,
        hs_ptr, cs_ptr, gates_ptr, dg_ptr, dp_ptr, dh_ptr, dc_ptr, lpart_ptr, bar_ptr,
        tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks, clip,
        dhseq_ptr, dx_ptr, hseq_ptr, T, B, I, H, O, n_btiles, dscale, lscale,
        LOSS: tl.constexpr, PER_STEP: tl.constexpr, OPT: tl.constexpr,
        BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
        BC: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
        UPDATE: tl.constexpr, HEAD: tl.constexpr, FWD_ONLY: tl.constexpr,
        DX: tl.constexpr, HSEQ: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    # ---- A: forward, loss, backward per batch tile ----
    for tile in range(pid, n_btiles, nprog):
        _batch_tile_forward_backward(
            x_ptr, tgt_ptr, h0_ptr, c0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
            hout_ptr, cout_ptr, hs_ptr, cs_ptr, gates_ptr, dg_ptr, dp_ptr, dh_ptr, dc_ptr,
            lpart_ptr, dhseq_ptr, hseq_ptr, tile, T, B, I, H, O, dscale,
            LOSS, PER_STEP, BB, BH, BK, OP, PREC, HEAD, FWD_ONLY, HSEQ)
    tl.debug_barrier()
    if nprog > 1:
        fu.grid_barrier(bar_ptr, nprog)

    # ---- B: parameter gradients (and a stacked layer's dx), tile by tile, fixed-order sums
    H4 = 4 * H
    if PER_STEP:
        TP = T
    else:
        TP = 1
    n_r4 = tl.cdiv(H4, BR)
    if HEAD:
        n_ro = tl.cdiv(O, BR)
    else:
        n_ro = 0
    n_ci = tl.cdiv(I, BC)
    n_ch = tl.cdiv(H, BC)
    e1 = n_r4 * n_ci          # weight_ih tiles
    e2 = e1 + n_r4 * n_ch     # weight_hh tiles
    e3 = e2 + n_ro * n_ch     # head.weight tiles
    e4 = e3 + n_r4            # bias_ih = bias_hh tiles
    e5 = e4 + n_ro            # head.bias tiles
    if DX:
        e6 = e5 + tl.cdiv(T * B, BR) * n_ci  # dx tiles: dG W_ih
    else:
        e6 = e5
    if FWD_ONLY:
        e6 = 0
    for k in range(pid, e6, nprog):
        if k < e1:
            r0 = (k // n_ci) * BR
            c0 = (k % n_ci) * BC
            _grad_tile(dg_ptr, B * H4, H4, r0, x_ptr, B * I, I, c0, gwih_ptr, T, B,
                       BB, BR, BC, PREC)
        elif k < e2:
            kk = k - e1
            r0 = (kk // n_ch) * BR
            c0 = (kk % n_ch) * BC
            _grad_tile(dg_ptr, B * H4, H4, r0, hs_ptr, B * H, H, c0, gwhh_ptr, T, B,
                       BB, BR, BC, PREC)
        elif k < e3:
            kk = k - e2
            r0 = (kk // n_ch) * BR
            c0 = (kk % n_ch) * BC
            # dP_t pairs with h_t = hs[t + 1] (terminal: the one dP with h_{T-1} = hs[T])
            _grad_tile(dp_ptr, B * O, O, r0, hs_ptr + (T - TP + 1) * B * H, B * H, H, c0,
                       gwo_ptr, TP, B, BB, BR, BC, PREC)
        elif k < e4:
            _bias_tile(dg_ptr, H4, (k - e3) * BR, gbih_ptr, gbhh_ptr, T * B, BB, BR)
        elif k < e5:
            _bias_tile(dp_ptr, O, (k - e4) * BR, gbo_ptr, gbo_ptr, TP * B, BB, BR)
        else:
            kk = k - e5
            _dx_tile(dg_ptr, wih_ptr, dx_ptr, (kk // n_ci) * BR, (kk % n_ci) * BC, T * B, H4,
                     I, BR, BC, BK, PREC)
    if pid == 0:
        total = tl.load(lpart_ptr, cache_modifier=".cg")
        for i in range(1, n_btiles):
            total += tl.load(lpart_ptr + i, cache_modifier=".cg")
        tl.store(loss_ptr, total * lscale)

    # ---- C: the FPTT update, kernels/fptt_update.py's phases (UPDATE=False: the launch
    # ends with the gradients, read by the host after the launch: no barrier needed) ----
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


def _config(device, B, H, I):
    if device.type == "cuda" and not _interpreted():
        return _GPU_CONFIG
    bbm, bhm, bkm, brm, bcm, nw = _INTERP_CONFIG_MAX
    return (_p2(B, 16, bbm), _p2(H, 16, bhm), _p2(max(H, I), 16, bkm), _p2(4 * H, 16, brm),
            _p2(max(H, I), 16, bcm), nw)


def _workspace(device, T, B, I, H, O, per_step, n_btiles):
    key = (device, T, B, I, H, O, bool(per_step))
    ws = _WORKSPACES.get(key)
    if ws is None:
        f32 = dict(dtype=torch.float32, device=device)
        ws = {"hs": torch.empty((T + 1) * B * H, **f32),
              "cs": torch.empty((T + 1) * B * H, **f32),
              "gates": torch.empty(T * B * 4 * H, **f32),
              "dg": torch.empty(T * B * 4 * H, **f32),
              "dp": torch.empty((T if per_step else 1) * B * O, **f32),
              "dh": torch.empty(B * H, **f32),
              "dc": torch.empty(2 * B * H, **f32),
              "lpart": torch.empty(n_btiles, **f32),
              "barrier": torch.zeros(2, dtype=torch.int32, device=device)}
        _WORKSPACES[key] = ws
        while len(_WORKSPACES) > _MAX_WORKSPACES:
            _WORKSPACES.popitem(last=False)
    else:
        _WORKSPACES.move_to_end(key)
    return ws


def _check_tensor(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device \
            or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def train_segment(state, segment, config, *, grid_limit=None) -> None:
    """One FPTT segment (forward, loss, truncated backward, FPTT update) in ONE launch.

    Shapes (T = segment length, B batch, I input, H hidden, O output size); every tensor
    float32 contiguous on one device unless said otherwise.
    state (fptt_fast.seam.FpttState), as kernels/fptt_update.fused_update takes it:
        params: [weight_ih_l0 [4H, I], weight_hh_l0 [4H, H], bias_ih_l0 [4H],
            bias_hh_l0 [4H], head.weight [O, H], head.bias [O]]; updated in place.
        grads: 6 tensors of the params' shapes, written with the task gradients (of
            weight * loss) before the update reads them (whatever they held before).
        w_bar, lam, exp_avg, exp_avg_sq, step, hyper, group_of, optimizer, clip, status.
    segment (fptt_fast.seam.SegmentIO):
        x: [T, B, I].
        target: loss 0 (MSE): float32 [B, O] (terminal) or [T, B, O] (per_step);
            loss 1 (cross-entropy): int64 class indices [B] or [T, B], in [0, O).
        h0, c0: [B, H], the (detached) state entering the segment; only read.
        h_out, c_out: [B, H], written with the state after the segment (they may be
            h0, c0 themselves: each batch row is read before it is written).
        losses: float32, 1 element, written with the unweighted segment loss.
    config (fptt_fast.seam.SegmentConfig):
        weight: the gradients are those of weight * loss.
        loss: 0 MSE (F.mse_loss, mean over all elements), 1 cross-entropy (mean over rows).
        per_step: False: the head on the last hidden state; True: on every step, the loss
            being the mean over the steps too.
        tf32: TF32 tensor-core matmuls on the GPU (default: IEEE fp32).
        update: False runs phases A and B only (the launch ends with grads, losses,
            h_out and c_out written): params, the optimiser's state, step and status are
            read by nobody and left untouched. Data-parallel training runs this, then the
            all-reduce of the gradients, then the FPTT update (fptt_fast.distributed).
        n_segs must be 1.
        head False: a lower layer of a stack: params and grads are its 4 tensors, no head,
            no loss (losses gets 0), no target; segment.dh_seq [T, B, H] is the gradient
            on its outputs. forward_only: the forward alone (h_out, c_out, h_seq). Both
            need update False. segment.dx [T, B, I] (optional) gets the gradient on x,
            segment.h_seq [T, B, H] (optional) every step's h.
    grid_limit (tests only): cap the number of programs.

    No host sync. Raises ValueError on bad shapes and beyond the limits (MAX_HIDDEN...).
    """
    x, target, h0, c0 = segment.x, segment.target, segment.h0, segment.c0
    h_out, c_out, loss_out = segment.h_out, segment.c_out, segment.losses
    params, grads = state.params, state.grads
    loss, per_step, weight = config.loss, config.per_step, config.weight
    if config.n_segs != 1:
        raise ValueError(f"the general Triton kernel runs one segment per launch, got "
                         f"config.n_segs={config.n_segs}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    T, B, I = x.shape
    head, fwd_only = bool(config.head), bool(config.forward_only)
    n_params = 6 if head else 4
    if len(params) != n_params or len(grads) != n_params:
        raise ValueError("params and grads must hold the 6 LSTM + head tensors" if head else
                         "without the head (config.head False) params and grads must hold a "
                         "layer's 4 tensors")
    if config.update and (not head or fwd_only):
        raise ValueError("config.update needs the head and the backward (the layers of a "
                         "stack are updated together, by the optimiser)")
    H = params[1].shape[1] if params[1].dim() == 2 else -1
    if head:
        O = params[4].shape[0] if params[4].dim() == 2 else -1
    else:
        O = 1  # sizes the unused head scratch
    dev = x.device
    if T < 1 or B < 1 or I < 1 or H < 1 or O < 1:
        raise ValueError(f"empty sizes: T={T}, B={B}, I={I}, H={H}, O={O}")
    if H > MAX_HIDDEN:
        raise ValueError(f"hidden size {H} exceeds the Triton segment kernel's limit "
                         f"MAX_HIDDEN={MAX_HIDDEN}")
    if I > MAX_INPUT:
        raise ValueError(f"input size {I} exceeds MAX_INPUT={MAX_INPUT}")
    if O > MAX_OUTPUT:
        raise ValueError(f"output size {O} exceeds MAX_OUTPUT={MAX_OUTPUT} (the head's "
                         "logits row is held in registers)")
    if max(T * B * 4 * H, T * B * I, 4 * H * max(H, I)) >= 2 ** 31:
        raise ValueError(f"segment too large for the kernel's int32 offsets: T*B*4H = "
                         f"{T * B * 4 * H}, T*B*I = {T * B * I}")
    if loss not in (LOSS_MSE, LOSS_CE):
        raise ValueError(f"loss must be 0 (mse) or 1 (ce), got {loss!r}")
    if dev.type == "cuda" and _interpreted():
        raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) cannot run on CUDA tensors")
    f32 = torch.float32
    _check_tensor("x", x, (T, B, I), f32, dev)
    per_step = per_step and head  # a layer without the head has no loss
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
    shapes = [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,), (O, H), (O,)][:n_params]
    for i, s in enumerate(shapes):
        _check_tensor(f"params[{i}]", params[i], s, f32, dev)
        _check_tensor(f"grads[{i}]", grads[i], s, f32, dev)
    for name, t in (("h0", h0), ("c0", c0), ("h_out", h_out), ("c_out", c_out)):
        _check_tensor(name, t, (B, H), f32, dev)
    if not isinstance(loss_out, torch.Tensor) or loss_out.numel() != 1 \
            or loss_out.dtype != f32 or loss_out.device != dev:
        raise ValueError(f"segment.losses must be a one-element float32 tensor on {dev}")

    if config.update:
        plan = fu.get_plan(state, tag="lstm_segment")
        chunk_size, block, pblock, _ = plan.config
        update_args = (plan.tables, plan.chunks, state.hyper, plan.partial, plan.chunk_step,
                       state.status, plan.n_chunks, float(state.clip))
        n_chunks = plan.n_chunks
    else:  # the update phase is compiled out: placeholders, never read
        chunk_size, block, pblock, n_chunks = 16, 16, 16, 0
        update_args = (x, x, x, x, x, x, 0, 0.0)
    BB, BH, BK, BR, BC, num_warps = _config(dev, B, H, I)
    OP = _p2(O, 16, MAX_OUTPUT)
    n_btiles = triton.cdiv(B, BB)
    ws = _workspace(dev, T, B, I, H, O, per_step, n_btiles)
    n_grad_tiles = (triton.cdiv(4 * H, BR) * (triton.cdiv(I, BC) + triton.cdiv(H, BC) + 1)
                    + triton.cdiv(O, BR) * (triton.cdiv(H, BC) + 1)
                    + (triton.cdiv(T * B, BR) * triton.cdiv(I, BC) if segment.dx is not None else 0))
    n_terms = (T if per_step else 1) * B * (O if loss == LOSS_MSE else 1)
    lscale = 1.0 / n_terms
    dscale = float(weight) / n_terms
    head_params = (params[4], params[5], grads[4], grads[5]) if head else (x, x, x, x)
    layer_io = tuple(t if t is not None else x
                     for t in (segment.dh_seq, segment.dx, segment.h_seq))
    args = (x, target, h0, c0, *params[:4], *head_params[:2], *grads[:4], *head_params[2:],
            h_out, c_out, loss_out,
            ws["hs"], ws["cs"], ws["gates"], ws["dg"], ws["dp"], ws["dh"], ws["dc"], ws["lpart"],
            ws["barrier"], *update_args, *layer_io, T, B, I, H, O, n_btiles, dscale, lscale)
    kw = dict(LOSS=int(loss), PER_STEP=bool(per_step), OPT=int(state.optimizer), BB=BB, BH=BH,
              BK=BK, BR=BR, BC=BC, OP=OP, PREC="tf32" if config.tf32 else "ieee",
              CHUNK=chunk_size, BLOCK=block, PBLOCK=pblock, UPDATE=bool(config.update),
              HEAD=head, FWD_ONLY=fwd_only, DX=segment.dx is not None,
              HSEQ=segment.h_seq is not None, num_warps=num_warps)
    work = max(n_btiles, n_grad_tiles, n_chunks)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            cap = _co_resident_cap(dev, (T, B, I, H, O), args, kw)
            if grid_limit is not None:
                cap = max(1, min(cap, int(grid_limit)))
            _lstm_segment_kernel[(max(1, min(cap, work)),)](*args, **kw)
    else:
        _lstm_segment_kernel[(1,)](*args, **kw)  # interpreter: one program, no barrier


_CAPS: dict = {}


def _co_resident_cap(dev, sizes, args, kw) -> int:
    """Programs that are surely resident at once (the grid barriers spin): see
    co_resident_cap."""
    return co_resident_cap(_lstm_segment_kernel, _CAPS, dev, sizes, args, kw,
                           "the LSTM segment kernel")


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
