// Helpers shared by the CPU segment steps of every cell (csrc/cpu/lstm_segment.cpp,
// gru_segment.cpp): 8-lane vector math for the gate rows, the OpenMP loop, the GEMM
// callback, column sums and the head's loss. Internal to csrc/cpu (each file gets its own
// copy: everything is in an anonymous namespace). Plain C++, no torch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "fptt_fast/lstm_args.h"
#include "fptt_fast/lstm_math.h"
#include "fptt_fast/lstm_segment.h"

namespace fptt {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The gate rows also in an AVX2 build, picked at load time (as fused_update.cpp's loops):
// the same IEEE operations in either (no FMA contraction under -std=c++17).
#define FPTT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FPTT_CPU_CLONES
#endif

// The gate math 8 floats at a time (GCC/Clang vector extensions: AVX2 in the avx2 clone,
// pairs of SSE registers in the default one); rows are walked in whole vectors, the last
// partial one through a zero-padded copy, so every element gets the same arithmetic.
#define FPTT_INLINE inline __attribute__((always_inline))
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// Activations on F8, branch-free: Cephes' single-precision polynomials (range reduction by
// ln 2 and degree 6 for exp; tanh's odd polynomial below 0.625), within a few ulp of
// libm's expf/tanhf, which ran one element at a time and were most of a segment step.
// inf and NaN come out as libm's do (the selects compare, they never clamp a NaN away).
struct VecMath {
  static FPTT_INLINE F8 exp(F8 x) {
    const I8 nan = x != x;
    F8 xc = x < -87.3f ? F8{} - 87.3f : x;
    xc = xc > 88.3f ? F8{} + 88.3f : xc;
    xc = nan ? F8{} : xc;  // (the int conversion below must not see NaN)
    const F8 r = xc * 1.44269504088896341f;
    const I8 n = __builtin_convertvector(r + (r >= 0.f ? F8{} + 0.5f : F8{} - 0.5f), I8);
    const F8 fn = __builtin_convertvector(n, F8);  // round(x / ln 2), in [-126, 127]
    F8 y = xc - fn * 0.693359375f;
    y = y - fn * -2.12194440e-4f;
    F8 p = F8{} + 1.9875691500e-4f;
    p = p * y + 1.3981999507e-3f;
    p = p * y + 8.3334519073e-3f;
    p = p * y + 4.1665795894e-2f;
    p = p * y + 1.6666665459e-1f;
    p = p * y + 5.0000001201e-1f;
    p = p * (y * y) + y + 1.f;
    const F8 scale = (F8)((n + 127) << 23);  // 2^n, built in the exponent bits
    return nan ? x : p * scale;
  }
  static FPTT_INLINE F8 sigmoid(F8 x) { return 1.f / (1.f + exp(-x)); }
  static FPTT_INLINE F8 tanh(F8 x) {
    const F8 ax = x < 0.f ? -x : x;
    const F8 big = 1.f - 2.f / (exp(2.f * ax) + 1.f);  // |x| >= 0.625
    const F8 z = x * x;
    F8 p = F8{} - 5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const F8 small = p * z * x + x;
    return ax >= 0.625f ? (x < 0.f ? -big : big) : small;  // NaN: small, which is NaN
  }
};

FPTT_INLINE F8 load8(const float* p) {
  F8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
FPTT_INLINE void store8(float* p, F8 v) { memcpy(p, &v, sizeof v); }

// Kernel::run(a) over a row of H elements in whole vectors: a[k] is arrays[k] + j (null
// stays null), read and written as F8; the last partial vector runs on zero-padded copies
// of the arrays' tails, written back. Everything here is inlined into the gate row
// functions, so that it compiles for their clone's instruction set (vectors never cross a
// call: their calling convention differs between the clones).
template <int N, class Kernel>
FPTT_INLINE void for_lanes(float* const (&arrays)[N], int64_t H) {
  float* at[N];
  int64_t j = 0;
  for (; j + kLanes <= H; j += kLanes) {
    for (int k = 0; k < N; ++k) at[k] = arrays[k] ? arrays[k] + j : nullptr;
    Kernel::run(at);
  }
  if (j == H) return;
  const int64_t rem = H - j;
  float tail[N][kLanes] = {};
  for (int k = 0; k < N; ++k) {
    at[k] = arrays[k] ? tail[k] : nullptr;
    if (arrays[k]) memcpy(tail[k], arrays[k] + j, sizeof(float) * rem);
  }
  Kernel::run(at);
  for (int k = 0; k < N; ++k)
    if (arrays[k]) memcpy(arrays[k] + j, tail[k], sizeof(float) * rem);
}

// Below this many elements a loop runs on the calling thread: waking the OpenMP team
// costs more than the work (and much more on a busy machine).
constexpr int64_t kParallelMin = 1 << 15;

// f(k) for k in [0, n): split over an OpenMP team if `parallel`, else a plain loop. Not an
// if() clause: libgomp still builds and tears down a one-thread team for a parallel region
// whose if() is false, about a microsecond per region on a busy 2-core VM, five regions
// per segment step at omega=1: more than the whole tiny step (same reasoning as
// fused_update.cpp's for_each_chunk). Every f(k) writes its own outputs, so the results
// do not depend on the branch taken.
template <class F>
inline void for_each(int64_t n, bool parallel, const F& f) {
  if (parallel) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n; ++k) f(k);
  } else {
    for (int64_t k = 0; k < n; ++k) f(k);
  }
}

inline void call(const Gemm& g, int ta, int tb, int64_t M, int64_t N, int64_t K, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  (g.fn ? g.fn : gemm_builtin)(g.ctx, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// Columns per block of column_sums: its running sums (doubles) stay in L1.
constexpr int64_t kColumnBlock = 256;

// The sums of one block of columns [j0, j1), row after row (A read in its memory order;
// the column-at-a-time loop strode A by `cols` floats and was a third of a segment step).
FPTT_CPU_CLONES void column_block_sums(const float* A, int64_t rows, int64_t cols, int64_t j0,
                                       int64_t j1, float* out) {
  double s[kColumnBlock] = {};
  const int64_t n = j1 - j0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = A + r * cols + j0;
    for (int64_t j = 0; j < n; ++j) s[j] += row[j];
  }
  for (int64_t j = 0; j < n; ++j) out[j0 + j] = float(s[j]);
}

// out[j] = sum over rows r of A[r, j] (A is [rows, cols]), in double, each column summed
// in row order: the same result whatever the blocks or threads.
void column_sums(const float* A, int64_t rows, int64_t cols, float* out) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  for_each(blocks, rows * cols >= kParallelMin, [&](int64_t k) {
    column_block_sums(A, rows, cols, k * kColumnBlock, std::min(cols, (k + 1) * kColumnBlock), out);
  });
}

// Loss of the head outputs `pred` [P, O]; overwrites pred with d(weight * loss)/d pred.
// The row math is lstm_math.h's, shared with the CUDA kernels; rows summed in order.
double loss_and_dpred(float* pred, int64_t P, int64_t O, const LstmSegmentArgs& a) {
  double total = 0.0;
  if (a.loss == LOSS_MSE) {
    const float scale = lstm::mse_scale(a.weight, P, O);
    for (int64_t r = 0; r < P; ++r) total += lstm::mse_row(pred + r * O, a.target_f + r * O, O, scale);
    return total / double(P * O);
  }
  const float scale = lstm::ce_scale(a.weight, P);
  for (int64_t r = 0; r < P; ++r) total += lstm::ce_row(pred + r * O, a.target_i[r], O, scale);
  return total / double(P);
}

// The head on the hidden states h_head [P, H] (P rows: the last step's or every step's),
// the loss, the head's gradients (a.g_w_o, a.g_b_o) and dhead [P, H], the gradient on
// h_head. pred: [P, O] scratch. Returns the unweighted loss.
inline double head_and_loss(const LstmSegmentArgs& a, const Gemm& gemm, const float* h_head,
                            int64_t P, float* pred, float* dhead) {
  const int64_t H = a.H, O = a.O;
  call(gemm, 0, 1, P, O, H, h_head, H, a.w_o, H, 0.f, pred, O);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t k = 0; k < O; ++k) pred[r * O + k] += a.b_o[k];
  const double loss = loss_and_dpred(pred, P, O, a);
  call(gemm, 1, 0, O, H, P, pred, O, h_head, H, 0.f, a.g_w_o, H);  // dW_o = dpred^T h
  column_sums(pred, P, O, a.g_b_o);
  call(gemm, 0, 0, P, H, O, pred, O, a.w_o, H, 0.f, dhead, H);    // dh from the head
  return loss;
}

}  // namespace
}  // namespace cpu
}  // namespace fptt
