"""The weight-stationary persistent Triton LSTM kernel: K FPTT segments in ONE launch.

Called by fptt_fast.FPTTLSTM for backend="triton" with m.triton_kernel = "persistent" (an
experiment, not a constructor argument until measured on a GPU), as
train(state, segment, config) (fptt_fast.seam's FpttState, SegmentIO, SegmentConfig, as
_C.lstm_train_cuda; config.kernel is not read); train_sequence(x, y, K) is one launch for
all K segments (K = T included), train_segment the case K = 1. Contracts: weight slices
stay in registers for a segment, so H <= 128, I <= 32, O <= 32 (ValueError beyond);
bitwise reproducible for any grid; not yet measured on a GPU.
Design: docs/KERNELS.md#kernelslstm_persistentpy
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from fptt_fast.reference import segment_bounds

from . import fptt_update as fu
from . import lstm_segment as ls
from . import segment_common as sc
from .lstm_segment import _sigmoid, _tanh

MAX_HIDDEN = 128
MAX_INPUT = 32
MAX_OUTPUT = 32
LOSS_MSE, LOSS_CE = ls.LOSS_MSE, ls.LOSS_CE

# GPU: (BB batch rows per tile, HS hidden units per program, num_warps)
_GPU_CONFIG = (16, 16, 8)
_INTERP_BB_MAX = 64  # interpreter: one program, every unit, tiles of up to 64 rows
_RBLOCK = 1024       # elements per block of the gradient reduction
_MAX_WORKSPACES = 8
_WORKSPACES: "OrderedDict[tuple, dict]" = OrderedDict()


# ----------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------


@triton.jit
def _group_sync(gbar_ptr, grp, NP: tl.constexpr):
    """The per-step sync of one group: a CTA barrier for a group of one program (orders
    the program's own global writes and reads), else fptt_update's sense-reversing
    barrier on the group's two words (spins: never used in the interpreter, NP == 1)."""
    if NP > 1:
        fu.grid_barrier(gbar_ptr + 2 * grp, NP)
    else:
        tl.debug_barrier()


@triton.jit
def _grid_sync(bar_ptr, nprog):
    tl.debug_barrier()
    if nprog > 1:
        fu.grid_barrier(bar_ptr, nprog)


@triton.jit
def _w_tile(ptr, row0, cols, um, stride, kk, km):
    """W[row0 + cols[j], kk[k]]^T as a [K, HS] register tile (W row-major, `stride`)."""
    return tl.load(ptr + (row0 + cols)[None, :] * stride + kk[:, None],
                   mask=km[:, None] & um[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _bias_cg(bih_ptr, bhh_ptr, off, cols, um):
    """b_ih + b_hh of the program's units (.cg: reloaded after other programs' update)."""
    return (tl.load(bih_ptr + off + cols, mask=um, other=0.0, cache_modifier=".cg")
            + tl.load(bhh_ptr + off + cols, mask=um, other=0.0, cache_modifier=".cg"))


@triton.jit
def _load_slices(wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr, cols, um, kk, km, ii, im,
                 oo, om, H, I):
    """The program's stationary weight tiles (module docstring)."""
    whh_i = _w_tile(whh_ptr, 0 * H, cols, um, H, kk, km)
    whh_f = _w_tile(whh_ptr, 1 * H, cols, um, H, kk, km)
    whh_g = _w_tile(whh_ptr, 2 * H, cols, um, H, kk, km)
    whh_o = _w_tile(whh_ptr, 3 * H, cols, um, H, kk, km)
    wih_i = _w_tile(wih_ptr, 0 * H, cols, um, I, ii, im)
    wih_f = _w_tile(wih_ptr, 1 * H, cols, um, I, ii, im)
    wih_g = _w_tile(wih_ptr, 2 * H, cols, um, I, ii, im)
    wih_o = _w_tile(wih_ptr, 3 * H, cols, um, I, ii, im)
    b_i = _bias_cg(bih_ptr, bhh_ptr, 0 * H, cols, um)
    b_f = _bias_cg(bih_ptr, bhh_ptr, 1 * H, cols, um)
    b_g = _bias_cg(bih_ptr, bhh_ptr, 2 * H, cols, um)
    b_o = _bias_cg(bih_ptr, bhh_ptr, 3 * H, cols, um)
    wo = tl.load(wo_ptr + oo[:, None] * H + cols[None, :], mask=om[:, None] & um[None, :],
                 other=0.0, cache_modifier=".cg")
    bo = tl.load(bo_ptr + oo, mask=om, other=0.0, cache_modifier=".cg")
    return (whh_i, whh_f, whh_g, whh_o, wih_i, wih_f, wih_g, wih_o, b_i, b_f, b_g, b_o, wo, bo)


@triton.jit
def _store_tile_grad(ptr, row0, cols, um, stride, kk, km, val):
    tl.store(ptr + (row0 + cols)[None, :] * stride + kk[:, None], val,
             mask=km[:, None] & um[None, :])


@triton.jit
def _head_loss(lg_ptr, tp, rows, rm, oo, om, bo, tgt_ptr, trow, B, O, dscale,
               LOSS: tl.constexpr, NP: tl.constexpr, OP: tl.constexpr):
    """Logits of step tp (the group's partial logits summed in rank order, + b_out), the
    loss summed over the tile's rows and dP = d(dscale * loss sum)/d logits [BB, OP]."""
    m2 = rm[:, None] & om[None, :]
    base = lg_ptr + tp * NP * B * OP + rows[:, None] * OP + oo[None, :]
    logits = tl.load(base, mask=m2, other=0.0, cache_modifier=".cg")
    for r in tl.static_range(1, NP):
        logits += tl.load(base + r * B * OP, mask=m2, other=0.0, cache_modifier=".cg")
    logits += bo[None, :]
    return ls._loss_tile(logits, tgt_ptr, trow, rows, rm, oo, om, B, O, dscale, LOSS)


@triton.jit
def _lstm_persistent_kernel(
        x_ptr, tgt_ptr, h0_ptr, c0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
        gwih_ptr, gwhh_ptr, gbih_ptr, gbhh_ptr, gwo_ptr, gbo_ptr,
        hout_ptr, cout_ptr, loss_ptr,
        hs_ptr, cs_ptr, gates_ptr, lg_ptr, ex_ptr, part_ptr, lpart_ptr, gbar_ptr, bar_ptr,
        tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks, clip,
        T, B, I, H, O, n_segs, omega, weight, ramp, n_btiles, n_groups,
        LOSS: tl.constexpr, PER_STEP: tl.constexpr, OPT: tl.constexpr, NP: tl.constexpr,
        BB: tl.constexpr, HS: tl.constexpr, HP: tl.constexpr, IP: tl.constexpr,
        OP: tl.constexpr, PREC: tl.constexpr, RBLOCK: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    grp = pid // NP
    q = pid % NP
    H4 = 4 * H
    # this program's hidden units and the index vectors of the tiles
    cols = q * HS + tl.arange(0, HS)
    um = cols < H
    kk = tl.arange(0, HP)
    km = kk < H
    ii = tl.arange(0, IP)
    im = ii < I
    oo = tl.arange(0, OP)
    om = oo < O
    # layout of one tile's row of gradient partials (= the gradients' own layouts)
    e1 = H4 * I            # weight_ih
    e2 = e1 + H4 * H       # weight_hh
    e3 = e2 + H4           # bias (bias_ih = bias_hh)
    e4 = e3 + O * H        # head.weight
    S = e4 + O             # head.bias
    ex_half = NP * B * HP  # one parity of the dh exchange

    (whh_i, whh_f, whh_g, whh_o, wih_i, wih_f, wih_g, wih_o, b_i, b_f, b_g, b_o, wo,
     bo) = _load_slices(wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr, cols, um, kk, km,
                        ii, im, oo, om, H, I)

    for p in range(0, n_segs):
        a = p * omega
        L = tl.minimum(T - a, omega)  # this segment's length (the last may be shorter)
        if ramp:
            wgt = (p + 1.0) / n_segs
        else:
            wgt = weight
        if PER_STEP:
            n_terms = L * B
        else:
            n_terms = B
        if LOSS == 0:
            n_terms = n_terms * O
        dscale = wgt / n_terms
        lscale = 1.0 / n_terms

        for tile in range(grp, n_btiles, n_groups):
            rows = tile * BB + tl.arange(0, BB)
            rm = rows < B
            m_own = rm[:, None] & um[None, :]
            m_full = rm[:, None] & km[None, :]
            own = rows[:, None] * H + cols[None, :]
            full = rows[:, None] * H + kk[None, :]
            gown = rows[:, None] * H4 + cols[None, :]
            # ---- the state entering the segment: (h0, c0), then the carried one ----
            if p == 0:
                h_in = tl.load(h0_ptr + own, mask=m_own, other=0.0)
                c = tl.load(c0_ptr + own, mask=m_own, other=0.0)
            else:
                h_in = tl.load(hout_ptr + own, mask=m_own, other=0.0, cache_modifier=".cg")
                c = tl.load(cout_ptr + own, mask=m_own, other=0.0, cache_modifier=".cg")
            tl.store(hs_ptr + own, h_in, mask=m_own)
            tl.store(cs_ptr + own, c, mask=m_own)
            _group_sync(gbar_ptr, grp, NP)

            # ---- forward ----
            for t in range(0, L):
                h_prev = tl.load(hs_ptr + t * B * H + full, mask=m_full, other=0.0,
                                 cache_modifier=".cg")
                x_t = tl.load(x_ptr + (a + t) * B * I + rows[:, None] * I + ii[None, :],
                              mask=rm[:, None] & im[None, :], other=0.0)
                gi = _sigmoid(tl.dot(x_t, wih_i, input_precision=PREC)
                              + tl.dot(h_prev, whh_i, input_precision=PREC) + b_i[None, :])
                gf = _sigmoid(tl.dot(x_t, wih_f, input_precision=PREC)
                              + tl.dot(h_prev, whh_f, input_precision=PREC) + b_f[None, :])
                gg = _tanh(tl.dot(x_t, wih_g, input_precision=PREC)
                           + tl.dot(h_prev, whh_g, input_precision=PREC) + b_g[None, :])
                go = _sigmoid(tl.dot(x_t, wih_o, input_precision=PREC)
                              + tl.dot(h_prev, whh_o, input_precision=PREC) + b_o[None, :])
                c = gf * c + gi * gg
                h = go * _tanh(c)
                tl.store(hs_ptr + (t + 1) * B * H + own, h, mask=m_own)
                tl.store(cs_ptr + (t + 1) * B * H + own, c, mask=m_own)
                goff = gates_ptr + t * B * H4 + gown
                tl.store(goff, gi, mask=m_own)
                tl.store(goff + H, gf, mask=m_own)
                tl.store(goff + 2 * H, gg, mask=m_own)
                tl.store(goff + 3 * H, go, mask=m_own)
                if PER_STEP:
                    tp = t
                    has_head = t >= 0
                else:
                    tp = 0
                    has_head = t == L - 1
                if has_head:  # this program's partial logits h_t[:, slice] W_out[:, slice]^T
                    lg = tl.dot(h, tl.trans(wo), input_precision=PREC)
                    tl.store(lg_ptr + (tp * NP + q) * B * OP + rows[:, None] * OP + oo[None, :],
                             lg, mask=rm[:, None] & om[None, :])
                _group_sync(gbar_ptr, grp, NP)
            # the state after the segment (own units); read back by the next segment
            tl.store(hout_ptr + own, tl.load(hs_ptr + L * B * H + own, mask=m_own, other=0.0),
                     mask=m_own)
            tl.store(cout_ptr + own, c, mask=m_own)

            # ---- backward through the segment, gradients in registers ----
            gw_hi = tl.zeros([HP, HS], dtype=tl.float32)
            gw_hf = tl.zeros([HP, HS], dtype=tl.float32)
            gw_hg = tl.zeros([HP, HS], dtype=tl.float32)
            gw_ho = tl.zeros([HP, HS], dtype=tl.float32)
            gw_ii = tl.zeros([IP, HS], dtype=tl.float32)
            gw_if = tl.zeros([IP, HS], dtype=tl.float32)
            gw_ig = tl.zeros([IP, HS], dtype=tl.float32)
            gw_io = tl.zeros([IP, HS], dtype=tl.float32)
            gb_i = tl.zeros([HS], dtype=tl.float32)
            gb_f = tl.zeros([HS], dtype=tl.float32)
            gb_g = tl.zeros([HS], dtype=tl.float32)
            gb_o = tl.zeros([HS], dtype=tl.float32)
            gwo = tl.zeros([OP, HS], dtype=tl.float32)
            gbo = tl.zeros([OP], dtype=tl.float32)
            lsum = tl.sum(tl.zeros([BB], dtype=tl.float32), axis=0)
            dh = tl.zeros([BB, HS], dtype=tl.float32)
            dc = tl.zeros([BB, HS], dtype=tl.float32)
            for s in range(0, L):
                t = L - 1 - s
                if PER_STEP:
                    tp = t
                    trow = a + t
                    has_head = t >= 0
                else:
                    tp = 0
                    trow = 0
                    has_head = t == L - 1
                if has_head:
                    ls_t, dp = _head_loss(lg_ptr, tp, rows, rm, oo, om, bo, tgt_ptr, trow, B, O,
                                          dscale, LOSS, NP, OP)
                    lsum += ls_t
                    dh += tl.dot(dp, wo, input_precision=PREC)
                    h_t = tl.load(hs_ptr + (t + 1) * B * H + own, mask=m_own, other=0.0)
                    gwo += tl.dot(tl.trans(dp), h_t, input_precision=PREC)
                    gbo += tl.sum(dp, axis=0)
                goff = gates_ptr + t * B * H4 + gown
                gi = tl.load(goff, mask=m_own, other=0.0)
                gf = tl.load(goff + H, mask=m_own, other=0.0)
                gg = tl.load(goff + 2 * H, mask=m_own, other=0.0)
                go = tl.load(goff + 3 * H, mask=m_own, other=0.0)
                c_t = tl.load(cs_ptr + (t + 1) * B * H + own, mask=m_own, other=0.0)
                c_prev = tl.load(cs_ptr + t * B * H + own, mask=m_own, other=0.0)
                tc = _tanh(c_t)
                dct = dc + dh * go * (1.0 - tc * tc)
                dg_i = dct * gg * gi * (1.0 - gi)
                dg_f = dct * c_prev * gf * (1.0 - gf)
                dg_g = dct * gi * (1.0 - gg * gg)
                dg_o = dh * tc * go * (1.0 - go)
                dc = dct * gf
                h_prev = tl.load(hs_ptr + t * B * H + full, mask=m_full, other=0.0,
                                 cache_modifier=".cg")
                h_prev_t = tl.trans(h_prev)
                gw_hi += tl.dot(h_prev_t, dg_i, input_precision=PREC)
                gw_hf += tl.dot(h_prev_t, dg_f, input_precision=PREC)
                gw_hg += tl.dot(h_prev_t, dg_g, input_precision=PREC)
                gw_ho += tl.dot(h_prev_t, dg_o, input_precision=PREC)
                x_tt = tl.trans(tl.load(x_ptr + (a + t) * B * I + rows[:, None] * I + ii[None, :],
                                        mask=rm[:, None] & im[None, :], other=0.0))
                gw_ii += tl.dot(x_tt, dg_i, input_precision=PREC)
                gw_if += tl.dot(x_tt, dg_f, input_precision=PREC)
                gw_ig += tl.dot(x_tt, dg_g, input_precision=PREC)
                gw_io += tl.dot(x_tt, dg_o, input_precision=PREC)
                gb_i += tl.sum(dg_i, axis=0)
                gb_f += tl.sum(dg_f, axis=0)
                gb_g += tl.sum(dg_g, axis=0)
                gb_o += tl.sum(dg_o, axis=0)
                if t > 0:
                    # this program's part of dh_{t-1} = dG_t W_hh (its 4 x HS rows of W_hh)
                    part = tl.dot(dg_i, tl.trans(whh_i), input_precision=PREC)
                    part += tl.dot(dg_f, tl.trans(whh_f), input_precision=PREC)
                    part += tl.dot(dg_g, tl.trans(whh_g), input_precision=PREC)
                    part += tl.dot(dg_o, tl.trans(whh_o), input_precision=PREC)
                    xb = ex_ptr + (t % 2) * ex_half + rows[:, None] * HP
                    tl.store(xb + q * B * HP + kk[None, :], part, mask=rm[:, None])
                    _group_sync(gbar_ptr, grp, NP)
                    # the group's parts of this program's units, summed in rank order
                    dh = tl.load(xb + cols[None, :], mask=m_own, other=0.0, cache_modifier=".cg")
                    for r in tl.static_range(1, NP):
                        dh += tl.load(xb + r * B * HP + cols[None, :], mask=m_own, other=0.0,
                                      cache_modifier=".cg")

            # ---- the tile's gradients (of its rows, this segment) to its partial row ----
            prow = part_ptr + tile * S
            _store_tile_grad(prow, 0 * H, cols, um, I, ii, im, gw_ii)
            _store_tile_grad(prow, 1 * H, cols, um, I, ii, im, gw_if)
            _store_tile_grad(prow, 2 * H, cols, um, I, ii, im, gw_ig)
            _store_tile_grad(prow, 3 * H, cols, um, I, ii, im, gw_io)
            _store_tile_grad(prow + e1, 0 * H, cols, um, H, kk, km, gw_hi)
            _store_tile_grad(prow + e1, 1 * H, cols, um, H, kk, km, gw_hf)
            _store_tile_grad(prow + e1, 2 * H, cols, um, H, kk, km, gw_hg)
            _store_tile_grad(prow + e1, 3 * H, cols, um, H, kk, km, gw_ho)
            tl.store(prow + e2 + 0 * H + cols, gb_i, mask=um)
            tl.store(prow + e2 + 1 * H + cols, gb_f, mask=um)
            tl.store(prow + e2 + 2 * H + cols, gb_g, mask=um)
            tl.store(prow + e2 + 3 * H + cols, gb_o, mask=um)
            tl.store(prow + e3 + oo[:, None] * H + cols[None, :], gwo,
                     mask=om[:, None] & um[None, :])
            if q == 0:
                tl.store(prow + e4 + oo, gbo, mask=om)
                tl.store(lpart_ptr + tile, lsum)
        _grid_sync(bar_ptr, nprog)

        # ---- gradients: the tiles' partial rows summed in tile order ----
        lanes = tl.arange(0, RBLOCK)
        for blk in range(pid, tl.cdiv(S, RBLOCK), nprog):
            idx = blk * RBLOCK + lanes
            live = idx < S
            acc = tl.load(part_ptr + idx, mask=live, other=0.0, cache_modifier=".cg")
            for tile in range(1, n_btiles):
                acc += tl.load(part_ptr + tile * S + idx, mask=live, other=0.0,
                               cache_modifier=".cg")
            tl.store(gwih_ptr + idx, acc, mask=idx < e1)
            in_hh = (idx >= e1) & (idx < e2)
            tl.store(gwhh_ptr + (idx - e1), acc, mask=in_hh)
            in_b = (idx >= e2) & (idx < e3)
            tl.store(gbih_ptr + (idx - e2), acc, mask=in_b)
            tl.store(gbhh_ptr + (idx - e2), acc, mask=in_b)
            in_wo = (idx >= e3) & (idx < e4)
            tl.store(gwo_ptr + (idx - e3), acc, mask=in_wo)
            tl.store(gbo_ptr + (idx - e4), acc, mask=(idx >= e4) & live)
        if pid == 0:
            total = tl.load(lpart_ptr, cache_modifier=".cg")
            for tile in range(1, n_btiles):
                total += tl.load(lpart_ptr + tile, cache_modifier=".cg")
            tl.store(loss_ptr + p, total * lscale)
        _grid_sync(bar_ptr, nprog)

        # ---- the clip and the FPTT update: kernels/fptt_update.py's phases ----
        fu.update_phase1(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, n_chunks, pid,
                         nprog, CHUNK, BLOCK)
        _grid_sync(bar_ptr, nprog)
        fu.update_phase2(tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr,
                         n_chunks, clip, pid, nprog, OPT, CHUNK, BLOCK, PBLOCK)
        if p + 1 < n_segs:
            # every update (and every read of the step counts, phase 1) done: reload
            _grid_sync(bar_ptr, nprog)
            (whh_i, whh_f, whh_g, whh_o, wih_i, wih_f, wih_g, wih_o, b_i, b_f, b_g, b_o, wo,
             bo) = _load_slices(wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr, cols, um,
                                kk, km, ii, im, oo, om, H, I)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _p2(n, lo, hi=1 << 30):
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def stationary_floats(I, H, O, hs=None):
    """Floats one GPU program holds for the whole launch: its weight slices and the
    gradient accumulators of the same slices (module docstring)."""
    HP, IP, OP = _p2(H, 16), _p2(I, 16), _p2(O, 16)
    hs = _GPU_CONFIG[1] if hs is None else hs
    return 2 * hs * (4 * HP + 4 * IP + OP) + 8 * hs + 2 * OP


def limit_error(I, H, O):
    """Why the persistent kernel cannot take these sizes, or None."""
    for name, v, limit in (("hidden_size", H, "MAX_HIDDEN"), ("input_size", I, "MAX_INPUT"),
                           ("output_size", O, "MAX_OUTPUT")):
        lim = globals()[limit]
        if v > lim:
            return (f"{name}={v} exceeds the persistent Triton LSTM kernel's limit {limit}={lim} "
                    f"(its weight slices are held in registers; kernels/lstm_persistent.py); "
                    f"use triton_kernel 'general'")
    return None


def launch_config(device, B, H):
    """(BB, HS, NP, num_warps) for a launch on `device`."""
    HP = _p2(H, 16)
    if device.type == "cuda" and not _interpreted():
        BB, HS, nw = _GPU_CONFIG
        HS = min(HS, HP)
        return BB, HS, HP // HS, nw
    # interpreter: one program holds every unit (a group of one: no spinning sync)
    return _p2(B, 16, _INTERP_BB_MAX), HP, 1, 1


def _workspace(device, omega, B, I, H, O, per_step, BB, NP, HP, OP, n_btiles):
    def make():
        f32 = dict(dtype=torch.float32, device=device)
        S = 4 * H * (I + H + 1) + O * (H + 1)
        return {"hs": torch.empty((omega + 1) * B * H, **f32),
                "cs": torch.empty((omega + 1) * B * H, **f32),
                "gates": torch.empty(omega * B * 4 * H, **f32),
                "lg": torch.empty((omega if per_step else 1) * NP * B * OP, **f32),
                "ex": torch.empty(2 * NP * B * HP, **f32),
                "part": torch.empty(n_btiles * S, **f32),
                "lpart": torch.empty(n_btiles, **f32),
                "gbar": torch.zeros(2 * n_btiles, dtype=torch.int32, device=device),
                "barrier": torch.zeros(2, dtype=torch.int32, device=device)}
    key = (device, omega, B, I, H, O, bool(per_step), BB, NP, HP, OP)
    return sc.cached(_WORKSPACES, key, make, _MAX_WORKSPACES)


def segment_length(T, K):
    """omega = ceil(T/K), checked as reference.segment_bounds does (it raises)."""
    first = segment_bounds(T, K)[0]
    return first[1] - first[0]


def train(state, segment, config, *, grid_limit=None) -> None:
    """config.n_segs FPTT segments over segment.x in ONE launch (module docstring).

    segment.x: float32 [T, B, I], cut into n_segs segments of omega = ceil(T / n_segs)
        steps (the last may be shorter; n_segs must satisfy ceil(T/omega) == n_segs).
    segment.target: terminal: MSE float32 [B, O] / CE int64 [B], the same for every
        segment; per_step: [T, B, O] / [T, B], each segment taking its own steps.
    config.weight, config.ramp: segment p's loss is weighted (p + 1) / n_segs if ramp,
        else weight.
    segment.losses: float32 [n_segs], written with each segment's unweighted loss.
    segment.h_out, c_out: [B, H], the state after the last segment (they may be h0, c0).
    Everything else as kernels/lstm_segment.train_segment (state.params, grads: written
    with the LAST segment's task gradients; the FPTT state; status as fptt_update).
    grid_limit (tests only): cap the number of programs (whole groups).
    No host sync. ValueError beyond MAX_HIDDEN / MAX_INPUT / MAX_OUTPUT and on bad shapes.
    """
    x, target, h0, c0 = segment.x, segment.target, segment.h0, segment.c0
    h_out, c_out, losses = segment.h_out, segment.c_out, segment.losses
    params, grads = state.params, state.grads
    loss, per_step, n_segs = config.loss, config.per_step, config.n_segs
    if (not config.update or not config.head or config.forward_only
            or any(t is not None for t in (segment.dh_seq, segment.dx, segment.h_seq))):
        raise ValueError("the persistent kernel runs whole one-layer segments with their update: "
                         "config.update and head True, forward_only False, no dh_seq, dx or "
                         "h_seq (the general kernel, kernels/lstm_segment.py, takes those)")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [T, B, I] tensor, got {getattr(x, 'shape', x)!r}")
    T, B, I = x.shape
    if len(params) != 6 or len(grads) != 6:
        raise ValueError("params and grads must hold the 6 LSTM + head tensors")
    H = params[1].shape[1] if params[1].dim() == 2 else -1
    O = params[4].shape[0] if params[4].dim() == 2 else -1
    if min(T, B, I, H, O) < 1:
        raise ValueError(f"empty sizes: T={T}, B={B}, I={I}, H={H}, O={O}")
    err = limit_error(I, H, O)
    if err is not None:
        raise ValueError(err)
    K = int(n_segs)
    omega = segment_length(T, K)
    if max(T * B * max(I, O), (omega + 1) * B * 4 * H) >= 2 ** 31:
        raise ValueError(f"sequence too large for the kernel's int32 offsets: T*B*I = {T * B * I}, "
                         f"(omega+1)*B*4H = {(omega + 1) * B * 4 * H}")
    if loss not in (LOSS_MSE, LOSS_CE):
        raise ValueError(f"loss must be 0 (mse) or 1 (ce), got {loss!r}")
    dev = x.device
    if dev.type == "cuda" and _interpreted():
        raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) cannot run on CUDA tensors")
    f32 = torch.float32
    ls._check_tensor("x", x, (T, B, I), f32, dev)
    lead = (T, B) if per_step else (B,)
    if loss == LOSS_MSE:
        ls._check_tensor("target", target, lead + (O,), f32, dev)
    else:
        ls._check_tensor("target", target, lead, torch.int64, dev)
    shapes = [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,), (O, H), (O,)]
    for i, s in enumerate(shapes):
        ls._check_tensor(f"params[{i}]", params[i], s, f32, dev)
        ls._check_tensor(f"grads[{i}]", grads[i], s, f32, dev)
    for name, t in (("h0", h0), ("c0", c0), ("h_out", h_out), ("c_out", c_out)):
        ls._check_tensor(name, t, (B, H), f32, dev)
    ls._check_tensor("losses", losses, (K,), f32, dev)

    plan = fu.get_plan(state, tag="lstm_persistent")
    chunk_size, block, pblock, _ = plan.config
    BB, HS, NP, num_warps = launch_config(dev, B, H)
    HP, IP, OP = _p2(H, 16), _p2(I, 16), _p2(O, 16)
    n_btiles = triton.cdiv(B, BB)
    ws = _workspace(dev, omega, B, I, H, O, per_step, BB, NP, HP, OP, n_btiles)
    args = [x, target, h0, c0, *params, *grads, h_out, c_out, losses,
            ws["hs"], ws["cs"], ws["gates"], ws["lg"], ws["ex"], ws["part"], ws["lpart"],
            ws["gbar"], ws["barrier"], plan.tables, plan.chunks, state.hyper, plan.partial,
            plan.chunk_step, state.status, plan.n_chunks, float(state.clip), T, B, I, H, O, K,
            omega, float(config.weight), bool(config.ramp), n_btiles, 1]
    kw = dict(LOSS=int(loss), PER_STEP=bool(per_step), OPT=int(state.optimizer), NP=NP, BB=BB,
              HS=HS, HP=HP, IP=IP, OP=OP, PREC="tf32" if config.tf32 else "ieee", RBLOCK=_RBLOCK,
              CHUNK=chunk_size, BLOCK=block, PBLOCK=pblock, num_warps=num_warps)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            cap = _co_resident_cap(dev, (T, B, I, H, O, K), args, kw)
            if grid_limit is not None:
                cap = max(1, min(cap, int(grid_limit)))
            if cap < NP:
                raise RuntimeError(f"the persistent Triton LSTM kernel needs {NP} co-resident "
                                   f"programs per group, the device holds {cap}")
            n_groups = max(1, min(n_btiles, cap // NP))
            args[-1] = n_groups
            _lstm_persistent_kernel[(n_groups * NP,)](*args, **kw)
    else:
        _lstm_persistent_kernel[(1,)](*args, **kw)  # interpreter: one program (docstring)


_CAPS: dict = {}


def _co_resident_cap(dev, sizes, args, kw) -> int:
    """Programs surely resident at once (the group syncs spin): lstm_segment's
    co_resident_cap for this kernel."""
    return ls.co_resident_cap(_lstm_persistent_kernel, _CAPS, dev, sizes, args, kw,
                              "the persistent Triton LSTM kernel")
