"""fptt_fast.FPTTLSTM: the LSTM cell of fptt_fast.recurrent.FPTTRecurrent.

Its description (fptt_fast.cells.Cell): nn.LSTM's shapes, state (h, c), the reference
math (fptt_fast.reference.lstm_layer) and its kernels (csrc/cpu/lstm_segment.cpp,
kernels/lstm_segment.py, kernels/lstm_persistent.py, csrc/cuda/lstm_*.cu).
"""
from __future__ import annotations

from . import reference
from .cells import Cell
from .layout import LOSS_CODE  # noqa: F401 (re-exported: the loss codes)
from .recurrent import (CUDA_KERNELS, HEAD_KEYS, LOSSES, SEGMENT_BACKENDS,  # noqa: F401
                        TRITON_KERNELS, FPTTRecurrent)

LSTM_KEYS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
PARAM_NAMES = LSTM_KEYS + HEAD_KEYS

LSTM = Cell(name="lstm", title="FPTTLSTM", gates=4, states=("h", "c"),
            layer=reference.lstm_layer_state, backends=("reference", "cpu", "triton", "cuda"),
            cpu_binding="lstm_segment_step_cpu", triton_module="lstm_segment", cpu_plan=True,
            persistent=True, gpu_verified=True)


class FPTTLSTM(FPTTRecurrent):
    """An LSTM (nn.LSTM's parameters, names, gate order i, f, g, o and stacking) with a
    linear head nn.Linear(H, O), trained by FPTT one segment at a time. Arguments:
    FPTTRecurrent's.

        m = fptt_fast.FPTTLSTM(I, H, O, loss="mse", lr=1e-3, clip=1.0)
        loss, state = m.train_segment(x, target, state)      # one FPTT update
        losses = m.train_sequence(x, target, K)              # K segments, state carried
        out, state = m(x, state)                             # evaluation forward

    x is time-major [omega, B, I] like nn.LSTM (batch_first=True: [B, omega, I], and per-step
    targets and outputs batch-first too); state is (h, c), each [B, H]. Terminal
    targets are [B, O] (mse, float32) or [B] (ce, class indices); with per_step=True they
    are [omega, B, O] / [omega, B] and the loss is the mean over the segment's steps.

    One train_segment computes the LSTM forward over the segment from the given state
    (detached: the backward is truncated at the segment's start), the head and the loss
    (times `weight`), the backward through the segment, the parameter gradients, and one
    FPTT update (docs/ALGORITHM.md, steps 2-6) of all its parameters (4L + 2) by the module's own
    fptt_fast.FPTT optimiser (`m.optimizer`, same keyword arguments, its state is the FPTT
    state). The returned loss is the *unweighted* segment loss (a detached 0-dim tensor).

    Backends (`backend=`):
      reference  fptt_fast.reference: ReferenceLSTM's math, autograd, FPTT(backend="reference")
      cpu        one C++ call (fptt_fast._C.CpuLstmPlan, held per module): forward, loss,
                 backward and the fused FPTT update (fptt::cpu::fused_update), OpenMP,
                 deterministic
      triton     ONE Triton launch (fptt_fast.kernels.lstm_segment.train_segment): forward,
                 loss, backward, gradients and the FPTT update; CUDA tensors, or CPU tensors
                 under TRITON_INTERPRET=1 (slow, for tests). No host sync on a GPU.
                 An experiment, set on the module (m.triton_kernel = "persistent"; not a
                 constructor argument until it is measured on a GPU), runs
                 kernels/lstm_persistent.py instead (weights held in registers,
                 train_sequence's K segments in one launch; H <= 128, I <= 32, O <= 32).
      cuda       ONE C++/CUDA launch, fptt_fast._C.lstm_segment_step_cuda, when the extension
                 has it; it takes the same positional arguments as the Triton train_segment.
      auto       cpu on CPU tensors (reference if the extension is not built); on CUDA:
                 cuda > triton > the reference segment math with FPTT backend "auto"
    Parameters are float32 and must stay on the device given at construction (the
    optimiser's state lives there); build a new module to change device. Checkpoints:
    m.state_dict() (the parameters) with m.optimizer.state_dict() (the FPTT state).

    Sizes: any I, H, B, omega, O >= 1 on the reference and cpu backends (the cpu backend keeps
    about omega*B*7H + B*(2H+O) floats of scratch, allocated once per largest shape and reused).
    The triton kernel states its limits (kernels/lstm_segment.py: MAX_HIDDEN, MAX_INPUT,
    MAX_OUTPUT). Beyond them backend="auto" falls back to the reference segment math with the
    fused FPTT update (correct, slower: several launches; m.backend says "reference"), and an
    explicit backend="triton" raises ValueError naming the limit.
    """

    cell = LSTM

    def lstm_state_dict(self):
        """cell_state_dict: what nn.LSTM(I, H, num_layers) and nn.Linear(H, O) load."""
        return self.cell_state_dict()

    def load_lstm_state_dict(self, state_dict, head=None):
        """load_cell_state_dict of an nn.LSTM's state dict (keys may carry 'lstm.')."""
        return self.load_cell_state_dict(state_dict, head=head)
