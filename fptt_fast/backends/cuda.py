"""The cuda backend: the C++/CUDA kernels of fptt_fast._C (csrc/cuda, csrc/cuda_glue)."""
from __future__ import annotations

from . import extension
from .base import DeviceBackend, final_state, launch_args

# FPTTLSTM(cuda_kernel=...): lstm_train_cuda's kernel codes, and the names of what ran
KERNELS = {"auto": 0, "general": 1, "persistent": 2}
KERNEL_NAMES = {1: "general", 2: "persistent"}


def _extension():
    return extension()


class CudaBackend(DeviceBackend):
    name = "cuda"
    graphs = True
    layered = True

    def check_module(self, m):
        if m.num_layers > 1 and m.cuda_kernel == "persistent":
            raise ValueError("cuda_kernel='persistent' runs one layer; num_layers > 1 runs "
                             "the general kernel layer by layer (leave cuda_kernel 'auto')")

    def layer(self, m, state, io, config):
        """The general kernel without the update (config.update False: no update table)."""
        m.last_kernel = KERNEL_NAMES[_extension().lstm_train_cuda(state, io, config)]
        return io.losses

    def one_launch(self, m):
        return m.num_layers == 1

    def update_launcher(self, state):
        return lambda: _extension().fused_update_cuda(state)

    def sequence(self, m, x, target, state, n_segs, ramp, weight=1.0):
        fstate, io, config = launch_args(m, x, target, state, weight, n_segs, ramp)
        config.kernel = KERNELS[m.cuda_kernel]
        m.last_kernel = KERNEL_NAMES[_extension().lstm_train_cuda(fstate, io, config)]
        return io.losses, final_state(io)

    def gradients(self, m, x, target, state, weight):
        """The general kernel without the update (config.update False: the launch ends
        with the gradients, loss and state; the optimiser's state is not read)."""
        fstate, io, config = launch_args(m, x, target, state, weight, 1, False, update=False)
        m.last_kernel = KERNEL_NAMES[_extension().lstm_train_cuda(fstate, io, config)]
        return io.losses, final_state(io)
