// One parameter tensor taking part in a fused FPTT update: the slot every update kernel
// (CPU, CUDA; the Triton one reads the same fields from its own table) walks. Plain C++,
// no torch headers; host or device pointers as the backend needs. Every array holds n
// contiguous fp32 elements (any original shape, flattened).
#pragma once

#include <stdint.h>

namespace fptt {

struct UpdateSlot {
  float* w;            // [n] parameter, updated in place
  const float* g;      // [n] task gradient (read only)
  float* w_bar;        // [n] running average W-bar
  float* lam;          // [n] dual variable lambda
  float* s1;           // [n] SGD momentum buffer, or Adam/AdamW exp_avg
  float* s2;           // [n] Adam/AdamW exp_avg_sq; nullptr for SGD (never read)
  float* step;         // [1] updates this tensor has had (torch's state["step"], float)
  const float* hyper;  // [H_COUNT] its group's hyper-parameter row (fptt_math.h HyperIndex)
  int64_t n;           // elements; 0 is allowed (the step count still advances)
  int64_t chunk_begin; // CUDA: index of its first chunk in the global chunk numbering,
                       // sum_{j<i} chunks_of(n[j]) (ascending); the CPU update ignores it
};

}  // namespace fptt
