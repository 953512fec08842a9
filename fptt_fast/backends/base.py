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
  layer(m, state, io, config)    fused backends (layered): one layer of a stack, no update
                             (stacked_segment below composes them); returns the loss [1]
"""
from __future__ import annotations

import torch

from ..layout import LOSS_CODE, OPT_CODE
from ..seam import FpttState, SegmentConfig, SegmentIO


class Backend:
    name = "?"
    device_launch = False  # the update is a device launch: capturable, no host sync
    cpu_plan = False       # FPTT.step runs through a C++ plan (update_plan(groups, state))
    graphs = False         # FPTTLSTM.train_sequence can replay a captured CUDA graph
    layered = False        # a stack of layers runs as layer() launches (stacked_segment)

    def check_module(self, m) -> None:
        """Refuse now what the backend cannot run for module m (ValueError)."""

    def update(self, opt, sts, state) -> None:
        raise NotImplementedError(f"the {self.name} backend's update is a device launch")

    def update_launcher(self, state):
        raise NotImplementedError(f"the {self.name} backend's update runs on the host")

    def segment(self, m, x, target, state, weight, update):
        raise NotImplementedError

    def layer(self, m, state, io, config):
        raise NotImplementedError(f"the {self.name} backend runs a stack through autograd")

    def one_launch(self, m) -> bool:
        return False

    def sequence(self, m, x, target, state, n_segs, ramp, weight=1.0):
        raise NotImplementedError(f"the {self.name} backend runs one segment per call")

    def __reduce__(self):  # a module holding it pickles and copies by name
        from . import engine
        return engine, (self.name,)


def final_state(io):
    """The state a launch wrote: (h_out, c_out), or (h_out,) for a cell without c."""
    return (io.h_out,) if io.c_out is None else (io.h_out, io.c_out)


def gradient_buffers(m):
    """m's gradient buffers (allocated once): the fused steps write its task gradients here."""
    if m._grads is None:
        m._grads = [torch.zeros_like(p.detach()) for p in m.fptt_parameters()]
    return m._grads


def launch_args(m, x, target, state, weight, n_segs, ramp, update=True):
    """(FpttState, SegmentIO, SegmentConfig) of a device launch of module m over x: fresh
    h_out, c_out and losses [n_segs]; the optimiser's state (its hyper table refreshed)."""
    c0 = state[1] if len(state) > 1 else None  # (a GRU has no cell state)
    io = SegmentIO(x, target, state[0], c0, torch.empty_like(state[0]),
                   None if c0 is None else torch.empty_like(c0),
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


def stacked_segment(backend, m, x, target, state, weight, update):
    """One segment of an L-layer module (m.num_layers > 1) on a layered backend, one
    launch per layer and direction: layers 0 .. L-2 run their forward alone (each one's
    outputs, h_seq, are the next one's x); the top layer runs with the head and the loss
    and writes the gradient on its input (dx); then each lower layer, top down, runs
    again (its forward recomputed) from the gradient above (dh_seq) and writes its own dx
    for the layer below (not layer 0). The gradients land in m's gradient buffers; with
    update, the optimiser then steps every layer's and the head's parameters in one fused
    update, as for one layer. state: the cell's tuple ((h0, c0) or (h0,)) of [L, B, H].
    Returns (loss, the new state tuple)."""
    L, H = m.num_layers, m.hidden_size
    T, B = x.shape[0], x.shape[1]
    finals = tuple(torch.empty_like(t) for t in state)

    def io(k, **kw):  # layer k's entering state and outputs (c only for a cell that has it)
        two = len(state) > 1
        return SegmentIO(xs[k], kw.pop("target", None), state[0][k], state[1][k] if two else None,
                         finals[0][k], finals[1][k] if two else None, losses, **kw)

    params = [p.detach() for p in m.fptt_parameters()]
    grads = gradient_buffers(m)
    losses = torch.empty(1, dtype=torch.float32, device=x.device)
    opt = OPT_CODE[m.optimizer.base]  # not read: the layers run without the update

    def layer_state(k, head):
        idx = list(range(4 * k, 4 * k + 4)) + ([4 * L, 4 * L + 1] if head else [])
        return FpttState([params[i] for i in idx], [grads[i] for i in idx], [], [], [], [],
                         [], None, [], opt)

    def config(head, forward_only):
        return SegmentConfig(weight=float(weight), loss=LOSS_CODE[m.loss],
                             per_step=bool(m.per_step), update=False, tf32=bool(m.allow_tf32),
                             head=head, forward_only=forward_only)

    xs = [x]
    for k in range(L - 1):
        h_seq = torch.empty(T, B, H, dtype=torch.float32, device=x.device)
        backend.layer(m, layer_state(k, False), io(k, h_seq=h_seq), config(False, True))
        xs.append(h_seq)
    dh_seq, loss = None, None
    for k in reversed(range(L)):
        top = k == L - 1
        dx = torch.empty_like(xs[k]) if k > 0 else None
        out = backend.layer(m, layer_state(k, top),
                            io(k, target=target if top else None, dh_seq=dh_seq, dx=dx),
                            config(top, False))
        if top:
            loss = out.reshape(()).clone()  # the lower layers overwrite `losses` with 0
        dh_seq = dx
    if update:
        for p, g in zip(m.fptt_parameters(), grads):
            p.grad = g
        m.optimizer.step()
    return loss, finals
