// Binding of the fused FPTT update on the CPU: checks (update_checks.h, shared with the
// CUDA glue), then the OpenMP kernel.
#include <torch/extension.h>

#include <vector>

#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/update_checks.h"

namespace fptt {
namespace {

std::tuple<double, bool> fused_update_cpu(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> w_bars,
    std::vector<at::Tensor> lams, std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s,
    std::vector<at::Tensor> steps, at::Tensor hyper, std::vector<int64_t> group_of,
    int64_t optimizer, double clip) {
  // Every check (update_checks.h) before any data pointer is taken: a refused call
  // changes nothing.
  fptt::checks::check_fused_update_args("fused_update_cpu", params, grads, w_bars, lams, s1s,
                                        s2s, steps, hyper, group_of, optimizer, clip,
                                        /*status=*/nullptr, at::kCPU);
  const size_t n = params.size();
  std::vector<fptt::cpu::UpdateSlot> slots(n);
  const float* hp = hyper.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    slots[i] = {params[i].data_ptr<float>(), grads[i].data_ptr<float>(),
                w_bars[i].data_ptr<float>(), lams[i].data_ptr<float>(), s1s[i].data_ptr<float>(),
                optimizer == fptt::OPT_SGD ? nullptr : s2s[i].data_ptr<float>(),
                steps[i].data_ptr<float>(), hp + group_of[i] * fptt::H_COUNT, params[i].numel()};
  }
  fptt::cpu::UpdateResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = fptt::cpu::fused_update(slots.data(), int(n), int(optimizer), float(clip));
  }
  return {r.norm, r.skipped};
}

}  // namespace

void register_update_cpu(pybind11::module_& m) {
  m.def("fused_update_cpu", &fused_update_cpu,
        "FPTT steps 2-6 over lists of CPU fp32 tensors; returns (norm, skipped)");
}

}  // namespace fptt
