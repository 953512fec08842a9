"""What crosses from Python to the kernels: the Python twins of csrc/include/fptt_fast/seam.h.

Every compute entry point (the C++ bindings of fptt_fast._C and the Triton launchers in
fptt_fast.kernels) takes these three objects instead of parallel lists: an optimiser's
FPTT state over a list of parameters, a segment's tensors, and what the launch does.
The field names are the C++ structs' (seam_cast.h reads them by name).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FpttState:
    """FPTT's state of a list of parameters as the kernels read it; slot k of every list
    belongs to params[k]. exp_avg / exp_avg_sq are Adam's moments as torch names them; SGD
    keeps its momentum_buffer in exp_avg and reads no exp_avg_sq (it may repeat exp_avg)."""
    params: list
    grads: list
    w_bar: list
    lam: list
    exp_avg: list
    exp_avg_sq: list
    step: list                    # 1-element float32 step counters
    hyper: torch.Tensor | None    # [groups, len(HYPER_FIELDS)] float32
    group_of: list                # params[k]'s row of hyper
    optimizer: int                # OPT_CODE
    clip: float = 0.0             # global gradient-norm clip, 0: none
    status: torch.Tensor | None = None  # [norm, last skipped, skipped count]


@dataclass
class SegmentIO:
    """A segment's tensors, time-major: x [omega, B, I], target ([B, O], per step
    [omega, B, O]; ce: int64 classes), the entering state h0, c0 [B, H]; the GPU launches
    also take the outputs h_out, c_out [B, H] and losses [segments]. A lower layer of a
    stack (SegmentConfig.head False) takes dh_seq [omega, B, H], the gradient on its
    outputs from the layer above, instead of a target; dx [omega, B, I] (optional) receives
    the gradient on x (dG W_ih), h_seq [omega, B, H] (optional) every step's output."""
    x: torch.Tensor
    target: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    h_out: torch.Tensor | None = None
    c_out: torch.Tensor | None = None
    losses: torch.Tensor | None = None
    dh_seq: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    h_seq: torch.Tensor | None = None


@dataclass
class SegmentConfig:
    """What a segment launch does: the loss weight of a one-segment launch; n_segs > 1
    splits x into segments of ceil(omega / n_segs) steps weighted (p + 1) / n_segs if ramp,
    else weight; kernel: the CUDA kernel (0 auto, 1 general, 2 persistent); builtin_gemm:
    the CPU step's own GEMM instead of torch's (tests); head False: a lower layer of a
    stack (params: its 4 tensors, no head, no loss); forward_only: the forward alone
    (h_out, c_out, h_seq), no gradients, no update."""
    weight: float = 1.0
    loss: int = 0                 # LOSS_CODE: 0 mse, 1 ce
    per_step: bool = False
    update: bool = True
    n_segs: int = 1
    ramp: bool = False
    tf32: bool = False
    kernel: int = 0
    builtin_gemm: bool = False
    head: bool = True
    forward_only: bool = False
