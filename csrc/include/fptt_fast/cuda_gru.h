// The GRU segment step on CUDA (csrc/cuda/gru_segment.cu): plain C++, no torch or CUDA
// headers. cuda_lstm.h's launch_lstm_segment contract with nn.GRU's cell: the arguments
// are LstmSegmentArgs with G = 3H (gate blocks r, z, n) and c0 / c_out unused; the table
// is the update's over the segment's parameters, or empty (gradients only).
#pragma once

#include <stdint.h>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/lstm_args.h"

namespace fptt {
namespace cuda {

// Floats of scratch a segment of these sizes needs (16-byte aligned, no initialisation).
int64_t gru_scratch_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O, int per_step);

// One segment in one cooperative launch on `stream`; 0 or a cudaError_t code.
int launch_gru_segment(const lstm::LstmSegmentArgs& args, const UpdateTable& table,
                       int optimizer, float clip, float* status, int device, void* stream);

}  // namespace cuda
}  // namespace fptt
