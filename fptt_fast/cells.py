"""What a recurrent cell is to fptt_fast: its shapes, state, reference math and kernels.

fptt_fast.recurrent.FPTTRecurrent trains any cell described here; each cell's module
(lstm.py, gru.py) defines its Cell and its public class. Parameter names, shapes, stacking
and initialisation are torch's (nn.LSTM, nn.GRU): weight_ih_l{k} [gates*H, I or H],
weight_hh_l{k} [gates*H, H], bias_ih_l{k}, bias_hh_l{k} [gates*H].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Cell:
    name: str            # torch's module name in lower case ("lstm"): state-dict prefix
    title: str           # the public class ("FPTTLSTM"), for messages
    gates: int           # blocks of H rows in each weight and bias (LSTM 4, GRU 3)
    states: tuple        # the state's tensors, each [B, H]: ("h", "c") or ("h",)
    layer: Callable      # reference math of one layer: layer(x, state tuple, w_ih, w_hh,
                         # b_ih, b_hh) -> (outputs [T, B, H], state tuple)
    backends: tuple      # the backends with a segment kernel of this cell
    cpu_binding: str     # fptt_fast._C's one-segment binding on the cpu backend
    triton_module: str = ""  # fptt_fast.kernels' module of its general Triton kernel
    cpu_plan: bool = False  # the cpu backend's held plan (_C.CpuLstmPlan) runs it
    persistent: bool = False  # it has the one-launch persistent kernels (cuda, triton)
    gpu_verified: bool = False  # its one-layer GPU kernels have run on a GPU: backend="auto"
                                # picks them there (else the reference segment math)

    def public_state(self, state):
        """The state as torch's module returns it: (h, c) for an LSTM, h for a GRU."""
        return state if len(self.states) > 1 else state[0]
