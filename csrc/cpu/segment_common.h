// Helpers shared by the CPU segment steps of every cell (csrc/cpu/lstm_segment.cpp,
// gru_segment.cpp): 16-lane vector math for the gate rows, the OpenMP loop, the GEMM
// callbacks, column sums and the head's loss. Internal to csrc/cpu (each file gets its own
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
// The gate rows also in AVX-512 and AVX2 builds, picked at load time: the same IEEE
// operations in each (setup.py's -ffp-contract=off: no FMA contraction in the AVX-512 one).
#define FPTT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FPTT_CPU_CLONES
#endif

// The gate math 16 floats at a time (GCC/Clang vector extensions: one AVX-512 register in
// the avx512f clone, two AVX2 or four SSE registers in the others); rows are walked in
// whole vectors, the last partial one through a zero-padded copy, so every element gets
// the same arithmetic.
#define FPTT_INLINE inline __attribute__((always_inline))
typedef float FV __attribute__((vector_size(64)));
typedef int32_t IV __attribute__((vector_size(64)));
constexpr int kLanes = 16;

// Activations on FV, branch-free: Cephes' single-precision polynomials (range reduction by
// ln 2 and degree 6 for exp; tanh's odd polynomial below 0.625), within a few ulp of
// libm's expf/tanhf, which ran one element at a time and were most of a segment step.
// inf and NaN come out as libm's do (the selects compare, they never clamp a NaN away).
struct VecMath {
  static FPTT_INLINE FV exp(FV x) {
    const IV nan = x != x;
    FV xc = x < -87.3f ? FV{} - 87.3f : x;
    xc = xc > 88.3f ? FV{} + 88.3f : xc;
    xc = nan ? FV{} : xc;  // (the int conversion below must not see NaN)
    const FV r = xc * 1.44269504088896341f;
    const IV n = __builtin_convertvector(r + (r >= 0.f ? FV{} + 0.5f : FV{} - 0.5f), IV);
    const FV fn = __builtin_convertvector(n, FV);  // round(x / ln 2), in [-126, 127]
    FV y = xc - fn * 0.693359375f;
    y = y - fn * -2.12194440e-4f;
    FV p = FV{} + 1.9875691500e-4f;
    p = p * y + 1.3981999507e-3f;
    p = p * y + 8.3334519073e-3f;
    p = p * y + 4.1665795894e-2f;
    p = p * y + 1.6666665459e-1f;
    p = p * y + 5.0000001201e-1f;
    p = p * (y * y) + y + 1.f;
    const FV scale = (FV)((n + 127) << 23);  // 2^n, built in the exponent bits
    return nan ? x : p * scale;
  }
  static FPTT_INLINE FV sigmoid(FV x) { return 1.f / (1.f + exp(-x)); }
  static FPTT_INLINE FV tanh(FV x) {
    const FV ax = x < 0.f ? -x : x;
    const FV big = 1.f - 2.f / (exp(2.f * ax) + 1.f);  // |x| >= 0.625
    const FV z = x * x;
    FV p = FV{} - 5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const FV small = p * z * x + x;
    return ax >= 0.625f ? (x < 0.f ? -big : big) : small;  // NaN: small, which is NaN
  }
};

FPTT_INLINE FV loadv(const float* p) {
  FV v;
  memcpy(&v, p, sizeof v);
  return v;
}
FPTT_INLINE void storev(float* p, FV v) { memcpy(p, &v, sizeof v); }

// Kernel::run(a) over a row of H elements in whole vectors: a[k] is arrays[k] + j (null
// stays null), read and written as FV; the last partial vector runs on zero-padded copies
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

// A right operand of many products (Gemm's pack): packed once where the Gemm can.
struct Rhs {
  int trans_b;
  int64_t N, K;
  const float* b;
  int64_t ldb;
  const void* packed;  // null: plain products
};

// `uses`: how many products will read it (packing pays from two on).
inline Rhs prepare_rhs(const Gemm& g, int slot, int64_t uses, int trans_b, int64_t N, int64_t K,
                       int64_t m_max, const float* b, int64_t ldb) {
  const void* packed = uses >= 2 && g.pack && g.packed
                           ? g.pack(g.ctx, slot, trans_b, N, K, m_max, b, ldb)
                           : nullptr;
  return Rhs{trans_b, N, K, b, ldb, packed};
}

// C[M, N] = beta * C + A op(B), A [M, K] (lda); beta 0 or 1.
inline void call(const Gemm& g, const Rhs& r, int64_t M, const float* A, int64_t lda, float beta,
                 float* C, int64_t ldc) {
  if (r.packed) g.packed(g.ctx, r.packed, M, r.N, r.K, A, lda, beta, C, ldc);
  else call(g, 0, r.trans_b, M, r.N, r.K, A, lda, r.b, r.ldb, beta, C, ldc);
}

// dst [n, cols] (ld_dst) = src [n, cols] (ld_src)
inline void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t n,
                      int64_t cols) {
  for (int64_t r = 0; r < n; ++r) memcpy(dst + r * ld_dst, src + r * ld_src, sizeof(float) * cols);
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

// The head on the hidden states h_head [P, H] (P rows, ldh floats apart: the last step's
// or every step's), the loss, the head's gradients (a.g_w_o, a.g_b_o) and dhead [P, H],
// the gradient on h_head. pred: [P, O] scratch. Returns the unweighted loss.
inline double head_and_loss(const LstmSegmentArgs& a, const Gemm& gemm, const float* h_head,
                            int64_t ldh, int64_t P, float* pred, float* dhead) {
  const int64_t H = a.H, O = a.O;
  call(gemm, 0, 1, P, O, H, h_head, ldh, a.w_o, H, 0.f, pred, O);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t k = 0; k < O; ++k) pred[r * O + k] += a.b_o[k];
  const double loss = loss_and_dpred(pred, P, O, a);
  call(gemm, 1, 0, O, H, P, pred, O, h_head, ldh, 0.f, a.g_w_o, H);  // dW_o = dpred^T h
  column_sums(pred, P, O, a.g_b_o);
  call(gemm, 0, 0, P, H, O, pred, O, a.w_o, H, 0.f, dhead, H);    // dh from the head
  return loss;
}

}  // namespace
}  // namespace cpu
}  // namespace fptt
