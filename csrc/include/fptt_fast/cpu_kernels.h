// CPU kernels of fptt_fast: plain pointers, no torch headers.
#pragma once

#include <stdint.h>

#include "fptt_fast/update_slot.h"

namespace fptt {
namespace cpu {

// The update slot: update_slot.h (one definition for the CPU and CUDA kernels).
using UpdateSlot = ::fptt::UpdateSlot;

struct UpdateResult {
  double norm;   // global L2 norm of the regularised gradient, before clipping
  bool skipped;  // norm not finite: nothing was written
};

// docs/ALGORITHM.md steps 2-6 over all slots: one deterministic norm pass (fixed chunks,
// summed in a fixed order, whatever the thread count), then one update pass.
// clip <= 0: no clipping. A non-finite norm leaves every array untouched.
// Runs on the calling thread below a few chunks of work (kParallelMinElements in
// fused_update.cpp): the result is the same either way.
UpdateResult fused_update(const UpdateSlot* slots, int n_slots, int optimizer, float clip);

// The optimiser's status [norm, last step skipped, skipped-step count] (fptt_fast/optim.py,
// STATUS_*) after a step whose result the host has: the same values optim.py's _record
// writes (the norm rounded to float, +1 on a skip). Returns the count.
inline int64_t record_step_status(float* status, const UpdateResult& r) {
  status[0] = float(r.norm);
  status[1] = r.skipped ? 1.f : 0.f;
  if (r.skipped) status[2] += 1.f;
  return int64_t(status[2]);
}

}  // namespace cpu
}  // namespace fptt
