"""One FPTT segment of a GRU + linear head as ONE Triton kernel launch.

Called by fptt_fast.FPTTGRU for backend="triton" as train_segment(state, segment, config),
kernels/lstm_segment.train_segment's contract with nn.GRU's cell: weights [3H, ...] in
gate order r, z, n (b_hn inside r's product), segment.c0 and c_out None. Phases: forward,
loss and backward per batch tile (here) | the gradients | the FPTT update
(kernels/segment_common.py). Contracts: no float atomics, bitwise reproducible for any
grid; launches sharing a workspace must be stream-ordered. Design: docs/KERNELS.md,
"kernels/segment_common.py, kernels/gru_segment.py".
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import fptt_update as fu
from . import segment_common as sc
from .segment_common import MAX_HIDDEN, MAX_INPUT, MAX_OUTPUT

_MAX_WORKSPACES = 8
_WORKSPACES: "OrderedDict[tuple, dict]" = OrderedDict()


@triton.jit
def _projection(a_ptr, a_stride, rows, rm, w_ptr, b_ptr, block, cols, cm, K, H,
                BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A[rows] W[block * H + cols]^T + b[block * H + cols]: one gate block's projection."""
    acc = sc._gate_acc(tl.zeros([BB, BH], dtype=tl.float32), a_ptr, a_stride, rows, rm, w_ptr,
                       K, block * H, cols, cm, K, BK, PREC)
    return acc + tl.load(b_ptr + block * H + cols, mask=cm, other=0.0)[None, :]


@triton.jit
def _saved_step(gates_ptr, goff, ahn_ptr, hs_ptr, off, H, m2):
    """What the forward kept of one step for the backward: r, z, n, h W_hn^T + b_hn and the
    state h_{t-1} it read."""
    r = tl.load(gates_ptr + goff, mask=m2, other=0.0, cache_modifier=".cg")
    z = tl.load(gates_ptr + goff + H, mask=m2, other=0.0, cache_modifier=".cg")
    n = tl.load(gates_ptr + goff + 2 * H, mask=m2, other=0.0, cache_modifier=".cg")
    hn = tl.load(ahn_ptr + off, mask=m2, other=0.0, cache_modifier=".cg")
    hp = tl.load(hs_ptr + off, mask=m2, other=0.0, cache_modifier=".cg")
    return r, z, n, hn, hp


@triton.jit
def _batch_tile_forward_backward(
        x_ptr, tgt_ptr, h0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
        hout_ptr, hs_ptr, gates_ptr, ahn_ptr, dgx_ptr, dgh_ptr, dp_ptr, dh_ptr, dhd_ptr,
        lpart_ptr, dhseq_ptr, hseq_ptr, tile, T, B, I, H, O, dscale,
        LOSS: tl.constexpr, PER_STEP: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
        BK: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr, HEAD: tl.constexpr,
        FWD_ONLY: tl.constexpr, HSEQ: tl.constexpr):
    """Phase A for the batch rows tile*BB ... tile*BB + BB - 1: gates [T, B, 3H] (r, z, n)
    and ahn [T, B, H] (h W_hn^T + b_hn) kept for the backward, which writes dgx / dgh
    [T, B, 3H], the gradients on the input and recurrent projections."""
    rows = tile * BB + tl.arange(0, BB)
    rm = rows < B
    G = 3 * H
    BH_ = B * H
    for j0 in range(0, H, BH):  # h0 -> hs[0]
        cols = j0 + tl.arange(0, BH)
        m2 = rm[:, None] & (cols < H)[None, :]
        off = rows[:, None] * H + cols[None, :]
        tl.store(hs_ptr + off, tl.load(h0_ptr + off, mask=m2, other=0.0), mask=m2)
    tl.debug_barrier()

    # ---- forward ----
    for t in range(0, T):
        x_t = x_ptr + t * B * I
        h_prev = hs_ptr + t * BH_
        for j0 in range(0, H, BH):
            cols = j0 + tl.arange(0, BH)
            cm = cols < H
            m2 = rm[:, None] & cm[None, :]
            r = sc._sigmoid(_projection(x_t, I, rows, rm, wih_ptr, bih_ptr, 0, cols, cm, I, H,
                                        BB, BH, BK, PREC)
                            + _projection(h_prev, H, rows, rm, whh_ptr, bhh_ptr, 0, cols, cm, H,
                                          H, BB, BH, BK, PREC))
            z = sc._sigmoid(_projection(x_t, I, rows, rm, wih_ptr, bih_ptr, 1, cols, cm, I, H,
                                        BB, BH, BK, PREC)
                            + _projection(h_prev, H, rows, rm, whh_ptr, bhh_ptr, 1, cols, cm, H,
                                          H, BB, BH, BK, PREC))
            hn = _projection(h_prev, H, rows, rm, whh_ptr, bhh_ptr, 2, cols, cm, H, H, BB, BH,
                             BK, PREC)
            n = sc._tanh(_projection(x_t, I, rows, rm, wih_ptr, bih_ptr, 2, cols, cm, I, H, BB,
                                     BH, BK, PREC) + r * hn)
            off = rows[:, None] * H + cols[None, :]
            hp = tl.load(h_prev + off, mask=m2, other=0.0, cache_modifier=".cg")
            h_new = (1.0 - z) * n + z * hp
            tl.store(hs_ptr + (t + 1) * BH_ + off, h_new, mask=m2)
            if HSEQ:
                tl.store(hseq_ptr + t * BH_ + off, h_new, mask=m2)
            m_last = m2 & ((rows * 0 + t) == T - 1)[:, None]  # a tensor mask (interpreter)
            tl.store(hout_ptr + off, h_new, mask=m_last)
            goff = t * B * G + rows[:, None] * G + cols[None, :]
            tl.store(gates_ptr + goff, r, mask=m2)
            tl.store(gates_ptr + goff + H, z, mask=m2)
            tl.store(gates_ptr + goff + 2 * H, n, mask=m2)
            tl.store(ahn_ptr + t * BH_ + off, hn, mask=m2)
        tl.debug_barrier()  # h_t of every column before the next step reads it

    # ---- head and loss ----
    sc._tile_loss(hs_ptr, wo_ptr, bo_ptr, tgt_ptr, dp_ptr, lpart_ptr, tile, rows, rm, T, B, H,
                  O, dscale, LOSS, PER_STEP, HEAD, FWD_ONLY, BB, BK, OP, PREC)
    ocols = tl.arange(0, OP)  # the head's columns, for its gradient on h below
    om = ocols < O

    # ---- backward through the segment (truncated at its start) ----
    if not FWD_ONLY:
        sc._zero_tile(dh_ptr, rows, rm, H, BB, BH)
        tl.debug_barrier()
        for s in range(0, T):
            t = T - 1 - s
            # pass 1: the gate gradients and the direct part of dh_{t-1}, dh' z
            for j0 in range(0, H, BH):
                cols, cm, m2, off, dh = sc._dh_block(j0, dh_ptr, dhseq_ptr, dp_ptr, wo_ptr, t, T,
                                                     rows, rm, ocols, om, B, H, O, BH, HEAD,
                                                     PER_STEP, PREC)
                goff = t * B * G + rows[:, None] * G + cols[None, :]
                r, z, n, hn, hp = _saved_step(gates_ptr, goff, ahn_ptr, hs_ptr, t * BH_ + off, H,
                                              m2)
                d_an = dh * (1.0 - z) * (1.0 - n * n)
                d_az = dh * (hp - n) * z * (1.0 - z)
                d_ar = d_an * hn * r * (1.0 - r)
                tl.store(dgx_ptr + goff, d_ar, mask=m2)
                tl.store(dgx_ptr + goff + H, d_az, mask=m2)
                tl.store(dgx_ptr + goff + 2 * H, d_an, mask=m2)
                tl.store(dgh_ptr + goff, d_ar, mask=m2)
                tl.store(dgh_ptr + goff + H, d_az, mask=m2)
                tl.store(dgh_ptr + goff + 2 * H, d_an * r, mask=m2)
                tl.store(dhd_ptr + off, dh * z, mask=m2)
            tl.debug_barrier()
            # pass 2: dh_{t-1} = dh' z + dGh_t @ W_hh (not needed before the segment's start)
            if t > 0:
                for j0 in range(0, H, BH):
                    cols = j0 + tl.arange(0, BH)
                    cm = cols < H
                    m2 = rm[:, None] & cm[None, :]
                    off = rows[:, None] * H + cols[None, :]
                    acc = tl.load(dhd_ptr + off, mask=m2, other=0.0, cache_modifier=".cg")
                    for k0 in range(0, G, BK):
                        kk = k0 + tl.arange(0, BK)
                        km = kk < G
                        a = tl.load(dgh_ptr + t * B * G + rows[:, None] * G + kk[None, :],
                                    mask=rm[:, None] & km[None, :], other=0.0,
                                    cache_modifier=".cg")
                        w = tl.load(whh_ptr + kk[:, None] * H + cols[None, :],
                                    mask=km[:, None] & cm[None, :], other=0.0)
                        acc += tl.dot(a, w, input_precision=PREC)
                    tl.store(dh_ptr + off, acc, mask=m2)
                tl.debug_barrier()


@triton.jit
def _gru_segment_kernel(
        x_ptr, tgt_ptr, h0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
        gwih_ptr, gwhh_ptr, gbih_ptr, gbhh_ptr, gwo_ptr, gbo_ptr, hout_ptr, loss_ptr,
        hs_ptr, gates_ptr, ahn_ptr, dgx_ptr, dgh_ptr, dp_ptr, dh_ptr, dhd_ptr, lpart_ptr,
        bar_ptr, tab_ptr, chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks,
        clip, dhseq_ptr, dx_ptr, hseq_ptr, T, B, I, H, O, n_btiles, dscale, lscale,
        LOSS: tl.constexpr, PER_STEP: tl.constexpr, OPT: tl.constexpr,
        BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
        BC: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
        UPDATE: tl.constexpr, HEAD: tl.constexpr, FWD_ONLY: tl.constexpr,
        DX: tl.constexpr, HSEQ: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for tile in range(pid, n_btiles, nprog):  # ---- A: per batch tile ----
        _batch_tile_forward_backward(
            x_ptr, tgt_ptr, h0_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, wo_ptr, bo_ptr,
            hout_ptr, hs_ptr, gates_ptr, ahn_ptr, dgx_ptr, dgh_ptr, dp_ptr, dh_ptr, dhd_ptr,
            lpart_ptr, dhseq_ptr, hseq_ptr, tile, T, B, I, H, O, dscale,
            LOSS, PER_STEP, BB, BH, BK, OP, PREC, HEAD, FWD_ONLY, HSEQ)
    tl.debug_barrier()
    if nprog > 1:
        fu.grid_barrier(bar_ptr, nprog)
    # ---- B, C: the gradients, the loss, the FPTT update ----
    sc._gradients_and_update(
        pid, nprog, dgx_ptr, dgh_ptr, x_ptr, hs_ptr, dp_ptr, wih_ptr, gwih_ptr, gwhh_ptr,
        gbih_ptr, gbhh_ptr, gwo_ptr, gbo_ptr, dx_ptr, lpart_ptr, loss_ptr, bar_ptr, tab_ptr,
        chunk_ptr, hyper_ptr, partial_ptr, cstep_ptr, status_ptr, n_chunks, clip, T, B, I, H,
        O, 3 * H, n_btiles, lscale, PER_STEP, OPT, BB, BK, BR, BC, PREC, CHUNK, BLOCK, PBLOCK,
        UPDATE, HEAD, FWD_ONLY, DX, False)


def _workspace(device, T, B, H, O, per_step, n_btiles):
    def make():
        f32 = dict(dtype=torch.float32, device=device)
        return {"hs": torch.empty((T + 1) * B * H, **f32),
                "gates": torch.empty(T * B * 3 * H, **f32),
                "ahn": torch.empty(T * B * H, **f32),
                "dgx": torch.empty(T * B * 3 * H, **f32),
                "dgh": torch.empty(T * B * 3 * H, **f32),
                "dp": torch.empty((T if per_step else 1) * B * O, **f32),
                "dh": torch.empty(B * H, **f32),
                "dhd": torch.empty(B * H, **f32),
                "lpart": torch.empty(n_btiles, **f32),
                "barrier": torch.zeros(2, dtype=torch.int32, device=device)}
    key = (device, T, B, H, O, bool(per_step))
    return sc.cached(_WORKSPACES, key, make, _MAX_WORKSPACES)


def train_segment(state, segment, config, *, grid_limit=None) -> None:
    """One FPTT GRU segment (forward, loss, truncated backward, FPTT update) in ONE
    launch: kernels/lstm_segment.train_segment's arguments, with params [weight_ih_l0
    [3H, I], weight_hh_l0 [3H, H], bias_ih_l0 [3H], bias_hh_l0 [3H], head.weight [O, H],
    head.bias [O]] (a stack's layer: the first four) and segment.c0, c_out None."""
    c = sc.prepare(state, segment, config, gates=3, cell_state=False, tag="gru_segment",
                   limits=(MAX_HIDDEN, MAX_INPUT, MAX_OUTPUT))
    ws = _workspace(c.dev, c.T, c.B, c.H, c.O, c.per_step, c.n_btiles)
    args = (c.x, c.target, c.h0, *c.params, *c.grads, c.h_out, c.loss_out, ws["hs"],
            ws["gates"], ws["ahn"], ws["dgx"], ws["dgh"], ws["dp"], ws["dh"], ws["dhd"],
            ws["lpart"], ws["barrier"], *c.update_args, *c.layer_io, c.T, c.B, c.I, c.H, c.O,
            c.n_btiles, c.dscale, c.lscale)
    sc.launch(_gru_segment_kernel, _CAPS, "the GRU segment kernel", c, args, grid_limit)


_CAPS: dict = {}
