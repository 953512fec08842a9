// Binding of the GRU segment step on the CPU: the checks (lstm_checks.h, with the GRU's
// CellKind: gate blocks r, z, n, no cell state), then in one call the forward/loss/backward
// of csrc/cpu/gru_segment.cpp and, with config.update, the fused FPTT update
// (fptt::cpu::fused_update) on the gradients, its status in state.status. FPTTGRU's cpu
// backend calls it once per segment (fptt_fast/backends/cpu.py, bound_segment), a
// stack's layers once per layer and direction.
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "fptt_fast/cpu_binding.h"
#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/gru_segment.h"
#include "fptt_fast/lstm_checks.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/seam_cast.h"
#include "fptt_fast/update_slots.h"

namespace fptt {
namespace {

const checks::CellKind kGruCell{3, false, "gru_segment_step_cpu",
                                &cpu::gru_segment_workspace_floats};

// Returns (unweighted loss, h); a stack's dx and h_seq are written in place.
std::tuple<double, at::Tensor> gru_segment_step_cpu(const FpttState& state,
                                                    const SegmentIO& segment,
                                                    const SegmentConfig& config,
                                                    at::Tensor workspace) {
  const char* fn = kGruCell.cpu_fn;
  int64_t need = 0;  // every check before any data is touched
  const checks::LstmDims d = checks::check_lstm_segment_cpu_args(state, segment, config,
                                                                 workspace, at::kCPU, &need,
                                                                 kGruCell);
  if (config.loss == cpu::LOSS_CE && config.head && !config.forward_only)
    checks::check_ce_classes(fn, segment.target, d.O);
  grow_workspace(fn, workspace, need);

  std::vector<cpu::UpdateSlot> slots;
  if (config.update) slots = update_slots(state);
  at::Tensor h = at::empty({d.B, d.H}, segment.x.options());
  cpu::LstmSegmentArgs a = checks::segment_args(segment.x, segment.h0, segment.c0, segment,
                                                 state.params, state.grads, d, config);
  a.h_out = h.data_ptr<float>();
  a.scratch = workspace.data_ptr<float>();
  double loss = 0.0;
  cpu::UpdateResult r{0.0, false};
  {
    pybind11::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    const cpu::Gemm gemm = cpu_gemm(config.builtin_gemm);
    loss = cpu::gru_segment_grads(a, gemm);
    if (!slots.empty())
      r = cpu::fused_update(slots.data(), int(slots.size()), int(state.optimizer),
                            float(state.clip));
  }
  if (config.update) cpu::record_step_status(state.status.data_ptr<float>(), r);
  return {loss, h};
}

}  // namespace

void register_gru_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gru_segment_step_cpu", &gru_segment_step_cpu,
        "One FPTT GRU segment step on CPU tensors (segment.c0 None): forward over the "
        "segment, head and loss, backward, gradients (written to state.grads) and, if "
        "config.update, the fused FPTT update (its norm and skip recorded in state.status). "
        "Returns (unweighted loss, h). A layer of a stack: config.head False (dh_seq in, dx "
        "out), forward_only (h_seq out).",
        py::arg("state"), py::arg("segment"), py::arg("config"), py::arg("workspace"));
}

}  // namespace fptt
