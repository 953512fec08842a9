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

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import fptt_update as fu
from . import segment_common as sc
from .segment_common import (LOSS_CE, LOSS_MSE, MAX_HIDDEN, MAX_INPUT,  # noqa: F401
                             MAX_OUTPUT, _check_tensor, _gate_acc, _loss_tile, _sigmoid, _tanh,
                             co_resident_cap)

_MAX_WORKSPACES = 8
_WORKSPACES: "OrderedDict[tuple, dict]" = OrderedDict()


# ----------------------------------------------------------------------------------
# Device code (the shared pieces: kernels/segment_common.py)
# ----------------------------------------------------------------------------------


@triton.jit
def _bias_pair(bih_ptr, bhh_ptr, off, cols, cm):
    return (tl.load(bih_ptr + off + cols, mask=cm, other=0.0)
            + tl.load(bhh_ptr + off + cols, mask=cm, other=0.0))


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
            gi = sc._sigmoid(acc_i + b_i[None, :])
            gf = sc._sigmoid(acc_f + b_f[None, :])
            gg = sc._tanh(acc_g + b_g[None, :])
            go = sc._sigmoid(acc_o + b_o[None, :])
            off = rows[:, None] * H + cols[None, :]
            c_prev = tl.load(cs_ptr + t * BH_ + off, mask=m2, other=0.0, cache_modifier=".cg")
            c_new = gf * c_prev + gi * gg
            h_new = go * sc._tanh(c_new)
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
    sc._tile_loss(hs_ptr, wo_ptr, bo_ptr, tgt_ptr, dp_ptr, lpart_ptr, tile, rows, rm, T, B, H,
                  O, dscale, LOSS, PER_STEP, HEAD, FWD_ONLY, BB, BK, OP, PREC)
    ocols = tl.arange(0, OP)  # the head's columns, for its gradient on h below
    om = ocols < O

    # ---- backward through the segment (truncated at its start) ----
    if not FWD_ONLY:
        sc._zero_tile(dh_ptr, rows, rm, H, BB, BH)
        sc._zero_tile(dc_ptr + (T % 2) * BH_, rows, rm, H, BB, BH)
        tl.debug_barrier()
        for s in range(0, T):
            t = T - 1 - s
            # pass 1: dG_t and the gradient carried to c_{t-1}
            for j0 in range(0, H, BH):
                cols, cm, m2, off, dh = sc._dh_block(j0, dh_ptr, dhseq_ptr, dp_ptr, wo_ptr, t, T,
                                                     rows, rm, ocols, om, B, H, O, BH, HEAD,
                                                     PER_STEP, PREC)
                goff = t * B * H4 + rows[:, None] * H4 + cols[None, :]
                gi = tl.load(gates_ptr + goff, mask=m2, other=0.0, cache_modifier=".cg")
                gf = tl.load(gates_ptr + goff + H, mask=m2, other=0.0, cache_modifier=".cg")
                gg = tl.load(gates_ptr + goff + 2 * H, mask=m2, other=0.0, cache_modifier=".cg")
                go = tl.load(gates_ptr + goff + 3 * H, mask=m2, other=0.0, cache_modifier=".cg")
                c_t = tl.load(cs_ptr + (t + 1) * BH_ + off, mask=m2, other=0.0,
                              cache_modifier=".cg")
                c_prev = tl.load(cs_ptr + t * BH_ + off, mask=m2, other=0.0, cache_modifier=".cg")
                dc_next = tl.load(dc_ptr + ((t + 1) % 2) * BH_ + off, mask=m2, other=0.0,
                                  cache_modifier=".cg")
                tc = sc._tanh(c_t)
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

    # ---- B, C: the gradients (dG on both projections), the loss, the FPTT update ----
    sc._gradients_and_update(
        pid, nprog, dg_ptr, dg_ptr, x_ptr, hs_ptr, dp_ptr, wih_ptr, gwih_ptr, gwhh_ptr, gbih_ptr,
        gbhh_ptr, gwo_ptr, gbo_ptr, dx_ptr, lpart_ptr, loss_ptr, bar_ptr, tab_ptr, chunk_ptr,
        hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks, clip, T, B, I, H, O, 4 * H,
        n_btiles, lscale, PER_STEP, OPT, BB, BK, BR, BC, PREC, CHUNK, BLOCK, PBLOCK, UPDATE,
        HEAD, FWD_ONLY, DX, True)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------


def _workspace(device, T, B, I, H, O, per_step, n_btiles):
    def make():
        f32 = dict(dtype=torch.float32, device=device)
        return {"hs": torch.empty((T + 1) * B * H, **f32),
                "cs": torch.empty((T + 1) * B * H, **f32),
                "gates": torch.empty(T * B * 4 * H, **f32),
                "dg": torch.empty(T * B * 4 * H, **f32),
                "dp": torch.empty((T if per_step else 1) * B * O, **f32),
                "dh": torch.empty(B * H, **f32),
                "dc": torch.empty(2 * B * H, **f32),
                "lpart": torch.empty(n_btiles, **f32),
                "barrier": torch.zeros(2, dtype=torch.int32, device=device)}
    key = (device, T, B, I, H, O, bool(per_step))
    return sc.cached(_WORKSPACES, key, make, _MAX_WORKSPACES)


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
    c = sc.prepare(state, segment, config, gates=4, cell_state=True, tag="lstm_segment",
                   limits=(MAX_HIDDEN, MAX_INPUT, MAX_OUTPUT))
    ws = _workspace(c.dev, c.T, c.B, c.I, c.H, c.O, c.per_step, c.n_btiles)
    args = (c.x, c.target, c.h0, c.c0, *c.params, *c.grads, c.h_out, c.c_out, c.loss_out,
            ws["hs"], ws["cs"], ws["gates"], ws["dg"], ws["dp"], ws["dh"], ws["dc"], ws["lpart"],
            ws["barrier"], *c.update_args, *c.layer_io, c.T, c.B, c.I, c.H, c.O, c.n_btiles,
            c.dscale, c.lscale)
    sc.launch(_lstm_segment_kernel, _CAPS, "the LSTM segment kernel", c, args, grid_limit)


_CAPS: dict = {}
