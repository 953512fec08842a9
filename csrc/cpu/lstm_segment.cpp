// LSTM segment step on the CPU: forward, head, loss, backward through the segment and
// the parameter gradients (docs/ALGORITHM.md, step 1). No torch headers: the GEMMs go through a
// callback (the binding passes at::mm; gemm_builtin is the torch-free fallback), the
// pointwise math is lstm_math.h, shared with the CUDA kernels.
//
// Workspace layout (floats), G = 4H, P = rows of the head (B, or T*B if per_step):
//   gates [T, B, G]   pre-activations, then activated gates, then (backward) their gradients
//   hs    [T+1, B, H] h_{-1} = h0, h_0 .. h_{T-1}
//   cs    [T+1, B, H] likewise for c
//   pred  [P, O]      head outputs, then d(weight * loss)/d pred
//   dhead [P, H]      gradient on the hidden states from the head
//   dh    [B, H]      recurrent gradient on h_{t-1}
//   dc    [B, H]      gradient on c_{t-1}
//   bsum  [G]         b_ih + b_hh
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "fptt_fast/lstm_math.h"
#include "fptt_fast/lstm_segment.h"

namespace fptt {
namespace cpu {
namespace {

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

// f(b, j) for b in [0, rows), j in [0, cols): likewise, the team splitting the (b, j) pairs.
template <class F>
inline void for_each_2d(int64_t rows, int64_t cols, bool parallel, const F& f) {
  if (parallel) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t j = 0; j < cols; ++j) f(b, j);
  } else {
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t j = 0; j < cols; ++j) f(b, j);
  }
}

struct Layout {
  int64_t gates, hs, cs, pred, dhead, dh, dc, bsum, total;
};

Layout layout(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O, int per_step) {
  (void)I;
  const int64_t G = 4 * H, P = per_step ? T * B : B;
  Layout l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;  // 64-byte aligned sub-buffers
    return at;
  };
  l.gates = take(T * B * G);
  l.hs = take((T + 1) * B * H);
  l.cs = take((T + 1) * B * H);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dh = take(B * H);
  l.dc = take(B * H);
  l.bsum = take(G);
  l.total = off;
  return l;
}

inline void call(const Gemm& g, int ta, int tb, int64_t M, int64_t N, int64_t K, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  (g.fn ? g.fn : gemm_builtin)(g.ctx, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// out[j] = sum over rows r of A[r, j] (A is [rows, cols]); fixed order, in double.
void column_sums(const float* A, int64_t rows, int64_t cols, float* out) {
  for_each(cols, rows * cols >= kParallelMin, [&](int64_t j) {
    double s = 0.0;
    for (int64_t r = 0; r < rows; ++r) s += A[r * cols + j];
    out[j] = float(s);
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

}  // namespace

void gemm_builtin(void*, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  // Rows of C are split over threads; each element is accumulated over K in order.
  constexpr int64_t kBlockK = 256;
  for_each(M, M * N * K >= 8 * kParallelMin, [&](int64_t m) {
    float* __restrict c = C + m * ldc;
    if (beta == 0.f) {
      for (int64_t n = 0; n < N; ++n) c[n] = 0.f;
    }
    if (!trans_b) {
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        const int64_t k1 = std::min(K, k0 + kBlockK);
        for (int64_t k = k0; k < k1; ++k) {
          const float av = trans_a ? A[k * lda + m] : A[m * lda + k];
          const float* __restrict b = B + k * ldb;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) c[n] += av * b[n];
        }
      }
    } else {
      std::vector<float> arow;
      const float* ar = A + m * lda;
      if (trans_a) {
        arow.resize(K);
        for (int64_t k = 0; k < K; ++k) arow[k] = A[k * lda + m];
        ar = arow.data();
      }
      for (int64_t n = 0; n < N; ++n) {
        const float* __restrict b = B + n * ldb;
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += ar[k] * b[k];
        c[n] += s;
      }
    }
  });
}

int64_t lstm_segment_workspace_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                                      int per_step) {
  return layout(T, B, I, H, O, per_step).total;
}

double lstm_segment_grads(const LstmSegmentArgs& a, Gemm gemm) {
  const int64_t T = a.T, B = a.B, I = a.I, H = a.H, O = a.O, G = 4 * H, BH = B * H;
  const int64_t P = a.per_step ? T * B : B;
  const Layout l = layout(T, B, I, H, O, a.per_step);
  float* ws = a.scratch;
  float* gates = ws + l.gates;
  float* hs = ws + l.hs;
  float* cs = ws + l.cs;
  float* pred = ws + l.pred;
  float* dhead = ws + l.dhead;
  float* dh = ws + l.dh;
  float* dc = ws + l.dc;
  float* bsum = ws + l.bsum;

  // ---- forward -------------------------------------------------------------------
  memcpy(hs, a.h0, sizeof(float) * BH);
  memcpy(cs, a.c0, sizeof(float) * BH);
  for (int64_t j = 0; j < G; ++j) bsum[j] = a.b_ih[j] + a.b_hh[j];
  // input projection of all steps at once: gates = x W_ih^T + (b_ih + b_hh)
  call(gemm, 0, 1, T * B, G, I, a.x, I, a.w_ih, I, 0.f, gates, G);
  for_each(T * B, T * B * G >= kParallelMin, [&](int64_t r) {
    for (int64_t j = 0; j < G; ++j) gates[r * G + j] += bsum[j];
  });
  for (int64_t t = 0; t < T; ++t) {
    float* gt = gates + t * B * G;
    const float* h_prev = hs + t * BH;
    const float* c_prev = cs + t * BH;
    float* h_new = hs + (t + 1) * BH;
    float* c_new = cs + (t + 1) * BH;
    call(gemm, 0, 1, B, G, H, h_prev, H, a.w_hh, H, 1.f, gt, G);
    for_each_2d(B, H, BH >= kParallelMin / 4, [&](int64_t b, int64_t j) {
      {
        float* row = gt + b * G;
        const lstm::CellForward f =
            lstm::cell_forward(row[j], row[H + j], row[2 * H + j], row[3 * H + j], c_prev[b * H + j]);
        row[j] = f.i;
        row[H + j] = f.f;
        row[2 * H + j] = f.g;
        row[3 * H + j] = f.o;
        c_new[b * H + j] = f.c;
        h_new[b * H + j] = f.h;
      }
    });
  }
  memcpy(a.h_out, hs + T * BH, sizeof(float) * BH);
  memcpy(a.c_out, cs + T * BH, sizeof(float) * BH);

  // ---- head and loss ---------------------------------------------------------------
  const float* h_head = a.per_step ? hs + BH : hs + T * BH;  // [P, H]
  call(gemm, 0, 1, P, O, H, h_head, H, a.w_o, H, 0.f, pred, O);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t k = 0; k < O; ++k) pred[r * O + k] += a.b_o[k];
  const double loss = loss_and_dpred(pred, P, O, a);
  call(gemm, 1, 0, O, H, P, pred, O, h_head, H, 0.f, a.g_w_o, H);  // dW_o = dpred^T h
  column_sums(pred, P, O, a.g_b_o);
  call(gemm, 0, 0, P, H, O, pred, O, a.w_o, H, 0.f, dhead, H);    // dh from the head

  // ---- backward through the segment --------------------------------------------------
  memset(dh, 0, sizeof(float) * BH);
  memset(dc, 0, sizeof(float) * BH);
  for (int64_t t = T - 1; t >= 0; --t) {
    float* gt = gates + t * B * G;
    const float* c_prev = cs + t * BH;
    const float* c_cur = cs + (t + 1) * BH;
    const float* dh_head = a.per_step ? dhead + t * BH : (t == T - 1 ? dhead : nullptr);
    for_each_2d(B, H, BH >= kParallelMin / 4, [&](int64_t b, int64_t j) {
      {
        float* row = gt + b * G;
        const int64_t e = b * H + j;
        const float dh_tot = dh[e] + (dh_head ? dh_head[e] : 0.f);
        const lstm::CellBackward d = lstm::cell_backward(
            row[j], row[H + j], row[2 * H + j], row[3 * H + j], c_cur[e], c_prev[e], dh_tot, dc[e]);
        row[j] = d.d_ai;
        row[H + j] = d.d_af;
        row[2 * H + j] = d.d_ag;
        row[3 * H + j] = d.d_ao;
        dc[e] = d.dc_prev;
      }
    });
    if (t > 0) call(gemm, 0, 0, B, H, G, gt, G, a.w_hh, H, 0.f, dh, H);  // dh_{t-1}
  }

  // ---- parameter gradients over all steps at once ---------------------------------------
  call(gemm, 1, 0, G, H, T * B, gates, G, hs, H, 0.f, a.g_w_hh, H);  // dG^T h_{t-1}
  call(gemm, 1, 0, G, I, T * B, gates, G, a.x, I, 0.f, a.g_w_ih, I);  // dG^T x_t
  column_sums(gates, T * B, G, a.g_b_ih);
  memcpy(a.g_b_hh, a.g_b_ih, sizeof(float) * G);
  return loss;
}

}  // namespace cpu
}  // namespace fptt
