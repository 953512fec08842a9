// What the CPU segment bindings of every cell share (csrc/bind_lstm.cpp, bind_gru.cpp):
// the GEMM callback on torch's CPU BLAS and the workspace's growth. Torch headers.
#pragma once

#include <torch/extension.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "fptt_fast/error_message.h"

namespace fptt {

inline at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  // trans: the [rows, cols] matrix is the transpose of the stored [cols, rows] one
  return trans ? at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, opts)
               : at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
}

inline void torch_gemm(void*, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = view2d(A, M, K, lda, trans_a != 0);
  at::Tensor b = view2d(B, K, N, ldb, trans_b != 0);
  at::Tensor c = view2d(C, M, N, ldc, false);
  // at::cpu::: the CPU kernels of mm.out / addmm_ called directly, past the dispatcher and
  // the autograd layer (a microsecond per call at these sizes, seven calls per segment at
  // omega=1): the same structured kernel at::mm_out / Tensor::addmm_ reach, so the same
  // BLAS call and bitwise the same results.
  if (beta == 0.f) at::cpu::mm_out(c, a, b);
  else at::cpu::addmm_(c, a, b, beta, 1.0);
}

// Grows the workspace (in place: the caller's tensor) to `need` floats.
inline void grow_workspace(const char* fn, at::Tensor& workspace, int64_t need) {
  if (workspace.numel() >= need) return;  // grown once, then reused
  try {
    workspace.resize_({need});
  } catch (const c10::Error& e) {
    FPTT_CHECK(false, fn, ": workspace could not be grown to ", need,
                " floats: ", e.what_without_backtrace());
  }
}

}  // namespace fptt
