"""The reference backend: plain PyTorch (fptt_fast.reference), autograd, any device."""
from __future__ import annotations

import torch

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def update(self, opt, sts, state):
        hypers = [reference.Hyper.from_group(opt.param_groups[gi]) for gi in state.group_of]
        norm, skipped = reference.fptt_update_(state.params, state.grads, sts, hypers, opt.base,
                                               opt.clip, nonfinite="skip")
        opt._record(float(norm), bool(skipped))

    def segment(self, m, x, target, state, weight, update):
        params = m.fptt_parameters()
        with torch.enable_grad():
            loss, new_state = m._reference_loss(x, target, state)
            grads = torch.autograd.grad(weight * loss, params)
        if update:
            for p, g in zip(params, grads):
                p.grad = g
            m.optimizer.step()
        else:
            m._grads = list(grads)
        return loss.detach(), tuple(t.detach() for t in new_state)
