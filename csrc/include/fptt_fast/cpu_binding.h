// What the CPU segment bindings of every cell share (csrc/bind_lstm.cpp, bind_gru.cpp):
// the GEMM callbacks on torch's CPU BLAS and the workspace's growth. Torch headers.
#pragma once

#include <torch/extension.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <climits>
#include <cstdint>
#include <cmath>
#include <vector>

#include "fptt_fast/error_message.h"
#include "fptt_fast/lstm_segment.h"

// MKL's packed GEMM, where torch's CPU BLAS is MKL (its x86-64 builds export these from
// libtorch_cpu): weak, so that a torch on another BLAS loads and leaves them null. LP64
// (int dimensions), as torch itself calls MKL's sgemm_.
extern "C" {
size_t sgemm_pack_get_size_(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
void sgemm_pack_(const char* identifier, const char* trans, const int* m, const int* n,
                 const int* k, const float* alpha, const float* src, const int* ld, float* dest)
    __attribute__((weak));
void sgemm_compute_(const char* transa, const char* transb, const int* m, const int* n,
                    const int* k, const float* a, const int* lda, const float* b, const int* ldb,
                    const float* beta, float* c, const int* ldc) __attribute__((weak));
}

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

// The packed right operands (Gemm::pack): MKL's column-major view of C = A op(B) is
// C^T = op(B)^T A^T, so op(B)^T is packed as MKL's "A" operand. Two slots per thread,
// grown to the largest weights seen and kept (a segment packs its forward and backward
// weights once each, then every step's product reads them).
inline const void* mkl_pack(void*, int slot, int trans_b, int64_t N, int64_t K, int64_t m_max,
                            const float* B, int64_t ldb) {
  if (N > INT_MAX || K > INT_MAX || m_max > INT_MAX || ldb > INT_MAX) return nullptr;
  thread_local std::vector<float> buffers[2];
  const int m = int(N), n = int(m_max), k = int(K), ld = int(ldb);
  const float one = 1.f;
  const size_t floats = sgemm_pack_get_size_("A", &m, &n, &k) / sizeof(float) + 1;
  std::vector<float>& buf = buffers[slot & 1];
  if (buf.size() < floats + 16) buf.resize(floats + 16);
  // 64-byte aligned, as the workspace is: MKL may take another path (and round otherwise)
  // on another alignment, and a run must not depend on where malloc put the buffer
  float* dest = buf.data() + (16 - (reinterpret_cast<uintptr_t>(buf.data()) / sizeof(float)) % 16) % 16;
  sgemm_pack_("A", trans_b ? "T" : "N", &m, &n, &k, &one, B, &ld, dest);
  return dest;
}

inline void mkl_packed(void*, const void* packed, int64_t M, int64_t N, int64_t K, const float* A,
                       int64_t lda, float beta, float* C, int64_t ldc) {
  const int m = int(N), n = int(M), k = int(K), la = int(lda), lc = int(ldc);
  sgemm_compute_("P", "N", &m, &n, &k, static_cast<const float*>(packed), &k, A, &la, &beta, C,
                 &lc);
}

// Whether MKL's packed GEMM is there and computes what it should: both transposes of a
// small product, overwritten then accumulated, against a double-precision loop, once per
// process.
inline bool mkl_packed_ok() {
  static const bool ok = [] {
    if (!sgemm_pack_get_size_ || !sgemm_pack_ || !sgemm_compute_) return false;
    const int64_t M = 3, N = 5, K = 7;
    std::vector<float> a(M * K), b(K * N), c(M * N);
    for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 5) - 1.5f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = 0.25f * float(i % 7) - 0.5f;
    for (int trans_b = 0; trans_b < 2; ++trans_b) {  // b: [K, N], or [N, K] read transposed
      const void* p = mkl_pack(nullptr, 0, trans_b, N, K, M, b.data(), trans_b ? K : N);
      if (!p) return false;
      mkl_packed(nullptr, p, M, N, K, a.data(), K, 0.f, c.data(), N);
      mkl_packed(nullptr, p, M, N, K, a.data(), K, 1.f, c.data(), N);  // accumulates: 2 A op(B)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double s = 0.0;
          for (int64_t k = 0; k < K; ++k) s += double(a[i * K + k]) * b[trans_b ? j * K + k : k * N + j];
          if (std::fabs(2.0 * s - c[i * N + j]) > 1e-4) return false;
        }
    }
    return true;
  }();
  return ok;
}

// The GEMMs a CPU segment step runs on: torch's BLAS (with MKL's packed products where
// they are there), or with builtin_gemm the torch-free gemm_builtin.
inline cpu::Gemm cpu_gemm(bool builtin) {
  if (builtin) return cpu::Gemm{nullptr, nullptr};
  cpu::Gemm g{&torch_gemm, nullptr};
  if (mkl_packed_ok()) {
    g.pack = &mkl_pack;
    g.packed = &mkl_packed;
  }
  return g;
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
