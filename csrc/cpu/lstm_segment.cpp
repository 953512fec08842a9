// LSTM segment step on the CPU: forward, head, loss, backward through the segment and
// the parameter gradients (docs/ALGORITHM.md, step 1), called by csrc/bind_lstm.cpp.
// No torch headers: the GEMMs go through callbacks (the binding passes at::mm and MKL's
// packed GEMM; gemm_builtin is the torch-free fallback), the pointwise math is
// lstm_math.h, shared with the CUDA kernels. Why each step's GEMM input is [h | x | 1],
// and the workspace layout: docs/KERNELS.md#csrccpulstm_segmentcpp
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "fptt_fast/lstm_math.h"
#include "fptt_fast/lstm_segment.h"
#include "segment_common.h"

namespace fptt {
namespace cpu {
namespace {

// a: the four gate rows, c_prev, c_new, h_new.
struct ForwardLanes {
  static FPTT_INLINE void run(float* const* a) {
    const lstm::CellForwardT<FV> f = lstm::cell_forward<VecMath, FV>(
        loadv(a[0]), loadv(a[1]), loadv(a[2]), loadv(a[3]), loadv(a[4]));
    storev(a[0], f.i);
    storev(a[1], f.f);
    storev(a[2], f.g);
    storev(a[3], f.o);
    storev(a[5], f.c);
    storev(a[6], f.h);
  }
};

// a: the four gate rows, c_cur, c_prev, dh, dh_head (or null), dc.
struct BackwardLanes {
  static FPTT_INLINE void run(float* const* a) {
    const FV dh_tot = a[7] ? loadv(a[6]) + loadv(a[7]) : loadv(a[6]);
    const lstm::CellBackwardT<FV> d = lstm::cell_backward<VecMath, FV>(
        loadv(a[0]), loadv(a[1]), loadv(a[2]), loadv(a[3]), loadv(a[4]), loadv(a[5]), dh_tot,
        loadv(a[8]));
    storev(a[0], d.d_ai);
    storev(a[1], d.d_af);
    storev(a[2], d.d_ag);
    storev(a[3], d.d_ao);
    storev(a[8], d.dc_prev);
  }
};

// One row of the step's gates (G = 4H: i, f, g, o pre-activations, activated in place)
// and its new cell state and output.
FPTT_CPU_CLONES void gate_row_forward(float* row, const float* c_prev, float* c_new, float* h_new,
                                      int64_t H) {
  float* const arrays[7] = {row, row + H, row + 2 * H, row + 3 * H, const_cast<float*>(c_prev),
                            c_new, h_new};
  for_lanes<7, ForwardLanes>(arrays, H);
}

// One row backward: the activated gates become the pre-activation gradients, dc the
// gradient on the previous cell state. dh_head: the head's gradient on h, or null.
FPTT_CPU_CLONES void gate_row_backward(float* row, const float* c_cur, const float* c_prev,
                                       const float* dh, const float* dh_head, float* dc,
                                       int64_t H) {
  float* const arrays[9] = {row, row + H, row + 2 * H, row + 3 * H, const_cast<float*>(c_cur),
                            const_cast<float*>(c_prev), const_cast<float*>(dh),
                            const_cast<float*>(dh_head), dc};
  for_lanes<9, BackwardLanes>(arrays, H);
}

// xh holds every step's GEMM input [h_{t-1} | x_t | 1] (KX = H + I + 1 floats a row), so that
// one product with wcat = [W_hh | W_ih | b_ih + b_hh] gives a step's gate pre-activations
// and one product dG^T xh gives all of the layer's weight and bias gradients (dwcat).
struct Layout {
  int64_t gates, xh, cs, pred, dhead, dh, dc, wcat, dwcat, total;
};

Layout layout(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O, int per_step) {
  const int64_t G = 4 * H, KX = H + I + 1, P = per_step ? T * B : B;
  Layout l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;  // 64-byte aligned sub-buffers
    return at;
  };
  l.gates = take(T * B * G);
  l.xh = take((T + 1) * B * KX);
  l.cs = take((T + 1) * B * H);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dh = take(B * H);
  l.dc = take(B * H);
  l.wcat = take(G * KX);
  l.dwcat = take(G * KX);
  l.total = off;
  return l;
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
  const int64_t KX = H + I + 1, BK = B * KX;
  const int64_t P = a.per_step ? T * B : B;
  const Layout l = layout(T, B, I, H, O, a.per_step);
  float* ws = a.scratch;
  float* gates = ws + l.gates;
  float* xh = ws + l.xh;
  float* cs = ws + l.cs;
  float* pred = ws + l.pred;
  float* dhead = ws + l.dhead;
  float* dh = ws + l.dh;
  float* dc = ws + l.dc;
  float* wcat = ws + l.wcat;
  float* dwcat = ws + l.dwcat;

  // ---- forward -------------------------------------------------------------------
  for (int64_t j = 0; j < G; ++j) {
    memcpy(wcat + j * KX, a.w_hh + j * H, sizeof(float) * H);
    memcpy(wcat + j * KX + H, a.w_ih + j * I, sizeof(float) * I);
    wcat[j * KX + H + I] = a.b_ih[j] + a.b_hh[j];
  }
  for (int64_t r = 0; r < (T + 1) * B; ++r) {  // the last step's row: h_T alone
    float* row = xh + r * KX + H;
    if (r < T * B) memcpy(row, a.x + r * I, sizeof(float) * I);
    else memset(row, 0, sizeof(float) * I);
    row[I] = 1.f;
  }
  copy_rows(xh, KX, a.h0, H, B, H);
  memcpy(cs, a.c0, sizeof(float) * BH);
  const Rhs w_fwd = prepare_rhs(gemm, 0, T, 1, G, KX, B, wcat, KX);  // gates = xh wcat^T
  for (int64_t t = 0; t < T; ++t) {
    float* gt = gates + t * B * G;
    const float* c_prev = cs + t * BH;
    float* c_new = cs + (t + 1) * BH;
    float* h_new = xh + (t + 1) * BK;
    call(gemm, w_fwd, B, xh + t * BK, KX, 0.f, gt, G);
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gate_row_forward(gt + b * G, c_prev + b * H, c_new + b * H, h_new + b * KX, H);
    });
  }
  copy_rows(a.h_out, H, xh + T * BK, KX, B, H);
  memcpy(a.c_out, cs + T * BH, sizeof(float) * BH);
  if (a.h_seq) copy_rows(a.h_seq, H, xh + BK, KX, T * B, H);
  if (a.forward_only) return 0.0;

  // ---- head and loss (a lower layer of a stack: dh_seq from the layer above instead) ---
  double loss = 0.0;
  if (!a.skip_head)
    loss = head_and_loss(a, gemm, a.per_step ? xh + BK : xh + T * BK, KX, P, pred, dhead);

  // ---- backward through the segment --------------------------------------------------
  memset(dh, 0, sizeof(float) * BH);
  memset(dc, 0, sizeof(float) * BH);
  const Rhs w_bwd = prepare_rhs(gemm, 1, T - 1, 0, H, G, B, a.w_hh, H);  // dh_{t-1} = dG_t W_hh
  for (int64_t t = T - 1; t >= 0; --t) {
    float* gt = gates + t * B * G;
    const float* c_prev = cs + t * BH;
    const float* c_cur = cs + (t + 1) * BH;
    const float* dh_head = a.skip_head ? a.dh_seq + t * BH
                           : a.per_step ? dhead + t * BH
                                        : (t == T - 1 ? dhead : nullptr);
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gate_row_backward(gt + b * G, c_cur + b * H, c_prev + b * H, dh + b * H,
                        dh_head ? dh_head + b * H : nullptr, dc + b * H, H);
    });
    if (t > 0) call(gemm, w_bwd, B, gt, G, 0.f, dh, H);
  }

  // ---- parameter gradients over all steps at once: dG^T [h_{t-1} | x_t | 1] ----------
  call(gemm, 1, 0, G, KX, T * B, gates, G, xh, KX, 0.f, dwcat, KX);
  for (int64_t j = 0; j < G; ++j) {
    memcpy(a.g_w_hh + j * H, dwcat + j * KX, sizeof(float) * H);
    memcpy(a.g_w_ih + j * I, dwcat + j * KX + H, sizeof(float) * I);
    a.g_b_ih[j] = a.g_b_hh[j] = dwcat[j * KX + H + I];
  }
  if (a.dx) call(gemm, 0, 0, T * B, I, G, gates, G, a.w_ih, I, 0.f, a.dx, I);  // dG W_ih
  return loss;
}

}  // namespace cpu
}  // namespace fptt
