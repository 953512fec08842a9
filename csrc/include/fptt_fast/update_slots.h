// The fused update's slots over lists of tensors, built once here for every binding (the
// CPU optimiser and LSTM step, the CUDA glue). Host code with torch headers: bindings and
// glue only. The tensors must have passed update_checks.h; chunk_begin is left 0 (the CUDA
// glue numbers the chunks when it uploads the table).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "fptt_fast/fptt_math.h"
#include "fptt_fast/update_slot.h"

namespace fptt {

// Slot i: params[i] with its gradient, FPTT state, optimiser moments (s2s unused, may be
// empty, for SGD), step counter and hyper-parameter row hyper[group_of[i]].
inline std::vector<UpdateSlot> update_slots(const std::vector<at::Tensor>& params,
                                            const std::vector<at::Tensor>& grads,
                                            const std::vector<at::Tensor>& w_bars,
                                            const std::vector<at::Tensor>& lams,
                                            const std::vector<at::Tensor>& s1s,
                                            const std::vector<at::Tensor>& s2s,
                                            const std::vector<at::Tensor>& steps,
                                            const at::Tensor& hyper,
                                            const std::vector<int64_t>& group_of, bool sgd) {
  const float* hp = hyper.data_ptr<float>();
  std::vector<UpdateSlot> slots(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    slots[i] = {params[i].data_ptr<float>(), grads[i].data_ptr<float>(),
                w_bars[i].data_ptr<float>(), lams[i].data_ptr<float>(), s1s[i].data_ptr<float>(),
                sgd ? nullptr : s2s[i].data_ptr<float>(), steps[i].data_ptr<float>(),
                hp + group_of[i] * H_COUNT, params[i].numel(), 0};
  return slots;
}

}  // namespace fptt
