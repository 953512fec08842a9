"""The cpu backend: the C++/OpenMP kernels of fptt_fast._C (csrc/bind_*.cpp)."""
from __future__ import annotations

import torch

from ..layout import LOSS_CODE
from ..seam import SegmentConfig, SegmentIO
from . import extension
from .base import Backend, gradient_buffers


class CpuBackend(Backend):
    name = "cpu"
    cpu_plan = True
    layered = True

    def layer(self, m, state, io, config):
        """The cell's one-segment binding (m.cell.cpu_binding, e.g. lstm_segment_step_cpu)
        on the module's workspace (grown in place, reused)."""
        if m._workspace is None:
            m._workspace = torch.empty(0, dtype=torch.float32)
        config.builtin_gemm = bool(m.cpu_builtin_gemm)
        loss, *final = getattr(extension(), m.cell.cpu_binding)(state, io, config, m._workspace)
        for out, t in zip((io.h_out, io.c_out), final):
            out.copy_(t)
        io.losses.fill_(loss)
        return io.losses

    def bound_segment(self, m, x, target, state, weight, update):
        """One segment of a cell without a held plan: its binding with the whole FPTT state
        (the update inside the call, its status recorded in the optimiser's)."""
        opt = m.optimizer
        io = SegmentIO(x, target, state[0], state[1] if len(state) > 1 else None)
        config = SegmentConfig(weight=float(weight), loss=LOSS_CODE[m.loss],
                               per_step=bool(m.per_step), update=update,
                               builtin_gemm=bool(m.cpu_builtin_gemm))
        if m._workspace is None:
            m._workspace = torch.empty(0, dtype=torch.float32)
        fstate = opt.kernel_state(m.fptt_parameters(), gradient_buffers(m), x.device)
        loss, *final = getattr(extension(), m.cell.cpu_binding)(fstate, io, config, m._workspace)
        if update:
            opt.report_skipped(int(fstate.status[2].item()))
        return torch.tensor(loss, dtype=torch.float32), tuple(final)

    def update_plan(self, param_groups, state):
        """FPTT.step's C++ plan (_C.CpuUpdatePlan) over these groups and their state."""
        return extension().CpuUpdatePlan(param_groups, state)

    def update(self, opt, sts, state):
        norm, skipped = extension().fused_update_cpu(state)
        opt._record(norm, skipped)

    def segment(self, m, x, target, state, weight, update):
        """ONE C++ call, _C.CpuLstmPlan.step (csrc/bind_lstm.cpp). The plan holds the
        parameters, gradient buffers, workspace and the optimiser's FPTT state; it is cached
        on m with the optimiser's own plan (_C.CpuUpdatePlan) and the buffers it was built
        on, and rebuilt when any of them is replaced. A changed hyper-parameter, clip or
        parameter tensor makes the call return a PLAN_* code having done nothing: the
        optimiser refreshes itself and the call is made again. A cell without a held plan
        (m.cell.cpu_plan False) runs bound_segment."""
        if not m.cell.cpu_plan:
            return self.bound_segment(m, x, target, state, weight, update)
        opt = m.optimizer
        flags = (opt, m.loss, m.per_step, m.check_inputs, m.cpu_builtin_gemm)
        for _ in range(3):
            uplan = opt.cpu_plan()
            # (optimiser plan, grads, workspace, plan, what the plan's train() bakes in)
            cached = m.__dict__.get("_cpu_plan")
            if (cached is None or cached[0] is not uplan or cached[1] is not m._grads
                    or cached[2] is not m._workspace or cached[4] != flags):
                if m._grads is None:
                    m._grads = [torch.zeros_like(p.detach()) for p in m.fptt_parameters()]
                    m._workspace = torch.empty(0, dtype=torch.float32)
                fstate = opt.kernel_state(m.fptt_parameters(), m._grads, x.device)
                config = SegmentConfig(loss=LOSS_CODE[m.loss], per_step=bool(m.per_step),
                                       builtin_gemm=bool(m.cpu_builtin_gemm))
                plan = extension().CpuLstmPlan(fstate, m._workspace, uplan, opt, config,
                                               bool(m.check_inputs))
                cached = (uplan, m._grads, m._workspace, plan, flags)
                m.__dict__["_cpu_plan"] = cached  # a plain attribute, not a submodule
            loss, h, c, count = cached[3].step(x, target, state[0], state[1], weight, update,
                                               opt.param_groups, opt.clip)
            if count >= 0:
                if m._dist is None:  # train_segment's fast path from the next call on
                    m.__dict__["_cpu_fast"] = cached[3]
                if update:
                    opt.report_skipped(count)
                return loss, (h, c)
            opt.refresh_cpu_plan(count)
        raise RuntimeError("FPTTLSTM: the cpu segment plan is still stale after a rebuild (a bug)")
