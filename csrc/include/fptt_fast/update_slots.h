// The fused update's slots over an FpttState, built once here for every binding (the
// CPU optimiser and LSTM step, the CUDA glue). Host code with torch headers: bindings and
// glue only. The tensors must have passed update_checks.h; chunk_begin is left 0 (the CUDA
// glue numbers the chunks when it uploads the table).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "fptt_fast/fptt_math.h"
#include "fptt_fast/seam.h"
#include "fptt_fast/update_slot.h"

namespace fptt {

// Slot i: state.params[i] with its gradient, FPTT state, optimiser moments (exp_avg_sq
// unused for SGD), step counter and hyper-parameter row hyper[group_of[i]].
inline std::vector<UpdateSlot> update_slots(const FpttState& s) {
  const float* hp = s.hyper.data_ptr<float>();
  std::vector<UpdateSlot> slots(s.params.size());
  for (size_t i = 0; i < s.params.size(); ++i)
    slots[i] = {s.params[i].data_ptr<float>(), s.grads[i].data_ptr<float>(),
                s.w_bar[i].data_ptr<float>(),  s.lam[i].data_ptr<float>(),
                s.exp_avg[i].data_ptr<float>(),
                s.sgd() ? nullptr : s.exp_avg_sq[i].data_ptr<float>(),
                s.step[i].data_ptr<float>(),   hp + s.group_of[i] * H_COUNT,
                s.params[i].numel(),           0};
  return slots;
}

}  // namespace fptt
