// CPU kernels of fptt_fast: plain pointers, no torch headers.
#pragma once

#include <stdint.h>

namespace fptt {
namespace cpu {

// One parameter tensor taking part in a fused FPTT update. Every array holds n
// contiguous fp32 elements; s2 is unused (may be null) for SGD.
struct UpdateSlot {
  float* w;            // parameter, updated in place
  const float* g;      // task gradient (not modified)
  float* w_bar;        // running average
  float* lam;          // dual variable
  float* s1;           // SGD momentum buffer, or Adam exp_avg
  float* s2;           // Adam exp_avg_sq
  float* step;         // one float: updates this tensor has had (torch's state["step"])
  const float* hyper;  // its group's row of H_COUNT floats (fptt_math.h)
  int64_t n;
};

struct UpdateResult {
  double norm;   // global L2 norm of the regularised gradient, before clipping
  bool skipped;  // norm not finite: nothing was written
};

// FPTT.md steps 2-6 over all slots: one deterministic norm pass (fixed chunks,
// summed in a fixed order, whatever the thread count), then one update pass.
// clip <= 0: no clipping. A non-finite norm leaves every array untouched.
UpdateResult fused_update(const UpdateSlot* slots, int n_slots, int optimizer, float clip);

}  // namespace cpu
}  // namespace fptt
