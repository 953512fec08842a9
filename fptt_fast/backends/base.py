"""What every backend object offers FPTT and FPTTLSTM (one module per backend here).

FPTT (optimiser side):
  update(opt, sts, state)    host backends: the fused update of a gathered FpttState
                             (hyper filled), its status recorded on `opt`
  update_launcher(state)     device backends: a callable launching that update, returning
                             what a captured CUDA graph must keep alive
FPTTLSTM (segment side):
  segment(m, x, target, state, weight, update)   one segment: (loss, (h, c)); with update
                             False the gradients of weight * loss land in m._grads and
                             nothing else changes (data-parallel training reduces them first)
  one_launch(m)              whether sequence() runs K segments in one call
  sequence(m, x, target, state, n_segs, ramp)    K segments: (losses [K], (h, c)), no
                             optimiser bookkeeping (what a CUDA graph captures)
"""
from __future__ import annotations

import torch

from ..layout import LOSS_CODE
from ..seam import SegmentConfig, SegmentIO


class Backend:
    name = "?"
    device_launch = False  # the update is a device launch: capturable, no host sync
    cpu_plan = False       # FPTT.step runs through a C++ plan (update_plan(groups, state))
    graphs = False         # FPTTLSTM.train_sequence can replay a captured CUDA graph

    def check_module(self, m) -> None:
        """Refuse now what the backend cannot run for module m (ValueError)."""

    def update(self, opt, sts, state) -> None:
        raise NotImplementedError(f"the {self.name} backend's update is a device launch")

    def update_launcher(self, state):
        raise NotImplementedError(f"the {self.name} backend's update runs on the host")

    def segment(self, m, x, target, state, weight, update):
        raise NotImplementedError

    def one_launch(self, m) -> bool:
        return False

    def sequence(self, m, x, target, state, n_segs, ramp, weight=1.0):
        raise NotImplementedError(f"the {self.name} backend runs one segment per call")

    def __reduce__(self):  # a module holding it pickles and copies by name
        from . import engine
        return engine, (self.name,)


def gradient_buffers(m):
    """m's gradient buffers (allocated once): the fused steps write its task gradients here."""
    if m._grads is None:
        m._grads = [torch.zeros_like(p.detach()) for p in m.fptt_parameters()]
    return m._grads


def launch_args(m, x, target, state, weight, n_segs, ramp, update=True):
    """(FpttState, SegmentIO, SegmentConfig) of a device launch of module m over x: fresh
    h_out, c_out and losses [n_segs]; the optimiser's state (its hyper table refreshed)."""
    io = SegmentIO(x, target, state[0], state[1], torch.empty_like(state[0]),
                   torch.empty_like(state[1]),
                   torch.empty(n_segs, dtype=torch.float32, device=x.device))
    fstate = m.optimizer.kernel_state(m.fptt_parameters(), gradient_buffers(m), x.device)
    config = SegmentConfig(weight=float(weight), loss=LOSS_CODE[m.loss],
                           per_step=bool(m.per_step), update=update, n_segs=n_segs,
                           ramp=bool(ramp), tf32=bool(m.allow_tf32))
    return fstate, io, config


class DeviceBackend(Backend):
    """triton and cuda: the segment is a device launch with the update inside."""
    device_launch = True

    def segment(self, m, x, target, state, weight, update):
        if not update:
            return self.gradients(m, x, target, state, weight)
        opt = m.optimizer
        opt.device_step_begin()
        losses, state = self.sequence(m, x, target, state, 1, False, weight=weight)
        opt.device_step_end()
        return losses[0], state

    def gradients(self, m, x, target, state, weight):
        raise NotImplementedError
