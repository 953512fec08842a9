// The LSTM segment step on the CPU (csrc/cpu/lstm_segment.cpp): plain pointers, no torch
// headers. Forward over the segment from (h0, c0), head and loss, backward through the
// segment (truncated at its start) and the parameter gradients of weight * loss.
// The FPTT update is fptt::cpu::fused_update (cpu_kernels.h), called by the binding on
// the six gradients written here.
#pragma once

#include <stdint.h>

#include "fptt_fast/lstm_args.h"
#include "fptt_fast/lstm_math.h"

namespace fptt {
namespace cpu {

// C[M, N] = beta * C + op(A) op(B), row-major fp32 with leading dimensions; op(A) is
// A ([M, K], lda) or, if trans_a, A^T with A stored [K, M] (lda); likewise op(B) is
// B ([K, N], ldb) or B^T with B stored [N, K]. beta is 0 (C overwritten) or 1.
typedef void (*GemmFn)(void* ctx, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                       const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                       float* C, int64_t ldc);
// A right operand op(B) [K, N] used for many products of A [M, K] with M <= m_max (a
// segment's weights, at every step): pack may prepare it once in memory of its own, slot
// 0 or 1 (MKL's packed GEMM, in the binding), and return a handle for `packed`, which
// computes C[M, N] = beta * C + A op(B) (beta 0 or 1). A null pack, or a null handle: each
// product goes through fn.
typedef const void* (*GemmPackFn)(void* ctx, int slot, int trans_b, int64_t N, int64_t K,
                                  int64_t m_max, const float* B, int64_t ldb);
typedef void (*GemmPackedFn)(void* ctx, const void* packed, int64_t M, int64_t N, int64_t K,
                             const float* A, int64_t lda, float beta, float* C, int64_t ldc);
struct Gemm {
  GemmFn fn;  // null: the built-in blocked OpenMP GEMM below
  void* ctx;
  GemmPackFn pack = nullptr;
  GemmPackedFn packed = nullptr;
};

// The built-in GEMM (deterministic: each C element is summed over K in order by one thread).
void gemm_builtin(void* ctx, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc);

// Loss codes: lstm_math.h's, under this namespace's names.
using LossKind = ::fptt::lstm::LossCode;
using ::fptt::lstm::LOSS_CE;
using ::fptt::lstm::LOSS_MSE;

// One segment's inputs and outputs (host pointers): lstm_args.h, shared with the CUDA
// kernels. Here scratch is the workspace (lstm_segment_workspace_floats floats); the
// parameters are only read and loss_out is unused (lstm_segment_grads returns the loss).
using LstmSegmentArgs = ::fptt::lstm::LstmSegmentArgs;

int64_t lstm_segment_workspace_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                                      int per_step);

// Returns the unweighted segment loss (mean over the batch, and over the steps if per_step;
// 0 for a layer without the head, or forward_only). skip_head: the per-step gradient on
// the layer's outputs is dh_seq; dx: also the gradient on x.
double lstm_segment_grads(const LstmSegmentArgs& a, Gemm gemm);

}  // namespace cpu
}  // namespace fptt
