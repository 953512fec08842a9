// Input checks shared by the CPU and CUDA bindings of the fused update.
// Torch headers allowed here: only bindings and glue (.cpp) include this file.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

#include "fptt_fast/fptt_math.h"

namespace fptt {
namespace checks {

inline void check_slot_tensor(const at::Tensor& t, const char* what, size_t i, int64_t numel,
                              c10::DeviceType dev, c10::Device device) {
  TORCH_CHECK(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().type() == dev && t.device() == device, what, "[", i, "] is on ",
              t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, "[", i, "] has dtype ", t.scalar_type(),
              ", expected float32");
  TORCH_CHECK(t.is_contiguous(), what, "[", i, "] is not contiguous");
  TORCH_CHECK(t.numel() == numel, what, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
}

inline void check_update_lists(const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& w_bars,
                               const std::vector<at::Tensor>& lams,
                               const std::vector<at::Tensor>& s1s,
                               const std::vector<at::Tensor>& s2s,
                               const std::vector<at::Tensor>& steps, const at::Tensor& hyper,
                               const std::vector<int64_t>& group_of, int64_t optimizer,
                               c10::DeviceType dev) {
  const size_t n = params.size();
  TORCH_CHECK(optimizer >= OPT_SGD && optimizer <= OPT_ADAMW, "unknown optimizer code ",
              optimizer);
  const bool sgd = optimizer == OPT_SGD;
  TORCH_CHECK(grads.size() == n && w_bars.size() == n && lams.size() == n && s1s.size() == n &&
                  steps.size() == n && group_of.size() == n && (sgd || s2s.size() == n),
              "fused_update: the tensor lists differ in length");
  TORCH_CHECK(hyper.dim() == 2 && hyper.size(1) == H_COUNT && hyper.is_contiguous() &&
                  hyper.scalar_type() == at::kFloat,
              "hyper must be a contiguous float32 [groups, ", int(H_COUNT), "] tensor");
  if (n == 0) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK(hyper.device().type() == dev, "hyper is on ", hyper.device());
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_slot_tensor(params[i], "params", i, numel, dev, device);
    check_slot_tensor(grads[i], "grads", i, numel, dev, device);
    check_slot_tensor(w_bars[i], "w_bar", i, numel, dev, device);
    check_slot_tensor(lams[i], "lam", i, numel, dev, device);
    check_slot_tensor(s1s[i], sgd ? "momentum_buffer" : "exp_avg", i, numel, dev, device);
    if (!sgd) check_slot_tensor(s2s[i], "exp_avg_sq", i, numel, dev, device);
    check_slot_tensor(steps[i], "step", i, 1, dev, device);
    TORCH_CHECK(group_of[i] >= 0 && group_of[i] < hyper.size(0), "group index ", group_of[i],
                " of params[", i, "] is out of range");
  }
}

}  // namespace checks
}  // namespace fptt
