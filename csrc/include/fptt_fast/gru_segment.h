// The GRU segment step on the CPU (csrc/cpu/gru_segment.cpp): plain pointers, no torch
// headers. The LSTM step's contract (lstm_segment.h) with nn.GRU's cell: the arguments
// are lstm_args.h's LstmSegmentArgs with G = 3H (gate blocks r, z, n), and c0 / c_out
// unused (a GRU's state is h alone); the FPTT update is the binding's, after the call.
#pragma once

#include <stdint.h>

#include "fptt_fast/lstm_segment.h"  // Gemm, LstmSegmentArgs

namespace fptt {
namespace cpu {

int64_t gru_segment_workspace_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                                     int per_step);

// Forward, head and loss, backward and the parameter gradients of weight * loss (a stack's
// layer: lstm_segment_grads' skip_head, forward_only, dh_seq, dx, h_seq). Returns the
// unweighted loss (0 without the head).
double gru_segment_grads(const LstmSegmentArgs& a, Gemm gemm);

}  // namespace cpu
}  // namespace fptt
