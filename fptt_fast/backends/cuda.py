"""The cuda backend: the C++/CUDA kernels of fptt_fast._C (csrc/cuda, csrc/cuda_glue)."""
from __future__ import annotations

import torch

from ..layout import HYPER_FIELDS
from . import extension
from .base import DeviceBackend, launch_args

# FPTTLSTM(cuda_kernel=...): lstm_train_cuda's kernel codes, and the names of what ran
KERNELS = {"auto": 0, "general": 1, "persistent": 2}
KERNEL_NAMES = {1: "general", 2: "persistent"}


def _extension():
    return extension()


class CudaBackend(DeviceBackend):
    name = "cuda"
    graphs = True

    def update_launcher(self, state):
        return lambda: _extension().fused_update_cuda(state)

    def one_launch(self, m):
        return True

    def sequence(self, m, x, target, state, n_segs, ramp, weight=1.0):
        fstate, io, config = launch_args(m, x, target, state, weight, n_segs, ramp)
        config.kernel = KERNELS[m.cuda_kernel]
        m.last_kernel = KERNEL_NAMES[_extension().lstm_train_cuda(fstate, io, config)]
        return io.losses, (io.h_out, io.c_out)

    def gradients(self, m, x, target, state, weight):
        """lstm_train_cuda has no update switch, so the update is made to write nothing: the
        launch gets a hyper-parameter table of NaN (every parameter in its one row) and a
        status of its own. The update's norm is then NaN, and with a non-finite norm the
        fused update writes nothing but that status (csrc/cuda/fused_update_device.cuh,
        the non-finite-gradient guard), in the general and the persistent kernel alike.
        Its gradients, loss and state are those of the one-launch step; the cost: the
        update's first phase (reading w, g, w_bar, lam once) and one grid barrier."""
        fstate, io, config = launch_args(m, x, target, state, weight, 1, False)
        fstate.hyper, fstate.status = _update_off_tables(m, x.device)
        fstate.group_of = [0] * len(fstate.params)
        config.kernel = KERNELS[m.cuda_kernel]
        m.last_kernel = KERNEL_NAMES[_extension().lstm_train_cuda(fstate, io, config)]
        return io.losses, (io.h_out, io.c_out)


def _update_off_tables(m, device):
    """(hyper [1, len(HYPER_FIELDS)] of NaN, status [3]) for the gradients launch,
    allocated once per module and device (the glue caches its launch tables by these
    addresses). The status counts the launches whose update wrote nothing: all of them."""
    cached = m.__dict__.get("_dp_update_off")
    if cached is None or cached[0].device != device:
        cached = (torch.full((1, len(HYPER_FIELDS)), float("nan"), device=device),
                  torch.zeros(3, device=device))
        m.__dict__["_dp_update_off"] = cached  # a plain attribute, not a buffer
    return cached
