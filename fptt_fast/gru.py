"""fptt_fast.FPTTGRU: the GRU cell of fptt_fast.recurrent.FPTTRecurrent.

Its description (fptt_fast.cells.Cell): nn.GRU's shapes and gate order (r, z, n), the
state h, the reference math (fptt_fast.reference.gru_layer) and its kernels: cpu
(csrc/cpu/gru_segment.cpp, bound by csrc/bind_gru.cpp) and triton
(kernels/gru_segment.py).
"""
from __future__ import annotations

from . import reference
from .cells import Cell
from .recurrent import FPTTRecurrent

GRU = Cell(name="gru", title="FPTTGRU", gates=3, states=("h",),
           layer=reference.gru_layer_state, backends=("reference", "cpu", "triton"),
           cpu_binding="gru_segment_step_cpu", triton_module="gru_segment")


class FPTTGRU(FPTTRecurrent):
    """A GRU (nn.GRU's parameters, names, shapes, gate order r, z, n, bias placement and
    stacking) with a linear head nn.Linear(H, O), trained by FPTT one segment at a time:
    FPTTLSTM's methods and options, with nn.GRU's state, the tensor h ([B, H]; [L, B, H]
    with num_layers=L), given and returned where FPTTLSTM takes (h, c).

        m = fptt_fast.FPTTGRU(I, H, O, loss="mse", lr=1e-3, clip=1.0)
        loss, h = m.train_segment(x, target, h)          # one FPTT update
        losses = m.train_sequence(x, target, K)          # K segments, state carried
        out, h = m(x, h)                                 # evaluation forward
        m.load_gru_state_dict(nn_gru.state_dict(), head=linear.state_dict())

    Backends: reference (autograd), cpu (one C++ call per segment: forward, loss,
    backward and the fused FPTT update) and triton (one launch of its general kernel; CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1); a stack: one call or launch per
    layer and direction. There is no CUDA C++ GRU kernel, and the Triton one has not run
    on a GPU yet: backend="auto" on a GPU takes the reference segment math with the fused
    FPTT update; backend="triton" selects the kernel.
    """

    cell = GRU

    def gru_state_dict(self):
        """cell_state_dict: what nn.GRU(I, H, num_layers) and nn.Linear(H, O) load."""
        return self.cell_state_dict()

    def load_gru_state_dict(self, state_dict, head=None):
        """load_cell_state_dict of an nn.GRU's state dict (keys may carry 'gru.')."""
        return self.load_cell_state_dict(state_dict, head=head)
