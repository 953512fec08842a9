"""The triton backend: the Triton kernels of fptt_fast.kernels (CUDA tensors; CPU tensors
only under TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib

from .base import DeviceBackend, final_state, launch_args


def _general(m):
    """The module of m's cell's general kernel (kernels/lstm_segment.py, gru_segment.py)."""
    return importlib.import_module(f"fptt_fast.kernels.{m.cell.triton_module}")


class TritonBackend(DeviceBackend):
    name = "triton"
    layered = True

    def layer(self, m, state, io, config):
        """The general kernel, its update compiled out (config.update False)."""
        _general(m).train_segment(state, io, config)
        m.last_kernel = "general"
        return io.losses

    def update_launcher(self, state):
        from ..kernels import fptt_update

        def launch():
            fptt_update.fused_update(state)
            # its cached tables and scratch (a captured graph must hold them: the Triton
            # plan cache evicts, the CUDA glue's keeps what a graph uses)
            return fptt_update.get_plan(state)
        return launch

    @staticmethod
    def kernel(m) -> str:
        """The kernel m runs: "general", or "persistent" (m.triton_kernel, an experiment set
        on the module): ValueError for another value, a cell without it, a stack, or sizes
        beyond its limits (checked at every launch: the attribute may change)."""
        from ..recurrent import TRITON_KERNELS
        if m.triton_kernel not in TRITON_KERNELS:
            raise ValueError(f"triton_kernel must be one of {TRITON_KERNELS}, got "
                             f"{m.triton_kernel!r}")
        if m.triton_kernel != "persistent":
            return "general"
        if not m.cell.persistent:
            raise ValueError(f"triton_kernel='persistent' is an LSTM kernel; {m.cell.title} "
                             f"runs the general one (set triton_kernel 'general')")
        if m.num_layers > 1:
            raise ValueError("triton_kernel='persistent' runs one layer; num_layers > 1 runs "
                             "the general kernel layer by layer (set triton_kernel 'general')")
        from ..kernels import lstm_persistent
        err = lstm_persistent.limit_error(m.input_size, m.hidden_size, m.output_size)
        if err is not None:
            raise ValueError(err)
        return "persistent"

    def check_module(self, m):
        self.kernel(m)

    def one_launch(self, m):
        return self.kernel(m) == "persistent"

    def sequence(self, m, x, target, state, n_segs, ramp, weight=1.0):
        fstate, io, config = launch_args(m, x, target, state, weight, n_segs, ramp)
        if self.kernel(m) == "persistent":
            from ..kernels import lstm_persistent
            lstm_persistent.train(fstate, io, config)
        else:
            _general(m).train_segment(fstate, io, config)  # n_segs 1 (it checks)
        m.last_kernel = self.kernel(m)
        return io.losses, final_state(io)

    def gradients(self, m, x, target, state, weight):
        """The general kernel with its update phase compiled out (config.update False); also
        with m.triton_kernel "persistent", which has no update switch."""
        fstate, io, config = launch_args(m, x, target, state, weight, 1, False, update=False)
        _general(m).train_segment(fstate, io, config)
        m.last_kernel = "general"
        return io.losses, final_state(io)
