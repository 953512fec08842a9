// GRU segment step on the CPU: forward, head, loss, backward through the segment and the
// parameter gradients, called by csrc/bind_gru.cpp. The LSTM step's structure
// (lstm_segment.cpp: input projection of every step in one GEMM, one recurrent GEMM and
// one row pass per step, the weight gradients in one GEMM each) with nn.GRU's cell
// (gru_math.h) and its second projection h W_hh^T + b_hh kept per step: its n block is
// inside r's product, and the backward reads it.
#include <string.h>

#include "fptt_fast/gru_math.h"
#include "fptt_fast/gru_segment.h"
#include "segment_common.h"

namespace fptt {
namespace cpu {
namespace {

// a: ax_r, ax_z, ax_n (the row's input projection; the gates r, z, n after), ah_r, ah_z,
// ah_n, h_prev, h_new.
struct GruForwardLanes {
  static FPTT_INLINE void run(float* const* a) {
    const gru::GruForwardT<FV> f = gru::cell_forward<VecMath, FV>(
        loadv(a[0]), loadv(a[1]), loadv(a[2]), loadv(a[3]), loadv(a[4]), loadv(a[5]),
        loadv(a[6]));
    storev(a[0], f.r);
    storev(a[1], f.z);
    storev(a[2], f.n);
    storev(a[7], f.h);
  }
};

// a: r, z, n (become the gradients on ax_r, ax_z, ax_n), ah_r, ah_z, ah_n (become those
// on ah_r, ah_z, ah_n), h_prev, dh (in: from the next step; out: the direct part dh' z),
// dh_head (the head's or the layer above's gradient, or null).
struct GruBackwardLanes {
  static FPTT_INLINE void run(float* const* a) {
    const FV dh = a[8] ? loadv(a[7]) + loadv(a[8]) : loadv(a[7]);
    const gru::GruBackwardT<FV> d = gru::cell_backward<FV>(
        loadv(a[0]), loadv(a[1]), loadv(a[2]), loadv(a[5]), loadv(a[6]), dh);
    storev(a[0], d.d_ar);
    storev(a[1], d.d_az);
    storev(a[2], d.d_an);
    storev(a[3], d.d_ar);
    storev(a[4], d.d_az);
    storev(a[5], d.d_ahn);
    storev(a[7], d.dh_prev);
  }
};

FPTT_CPU_CLONES void gru_row_forward(float* ax, float* ah, const float* h_prev, float* h_new,
                                     int64_t H) {
  float* const arrays[8] = {ax, ax + H, ax + 2 * H, ah, ah + H, ah + 2 * H,
                            const_cast<float*>(h_prev), h_new};
  for_lanes<8, GruForwardLanes>(arrays, H);
}

FPTT_CPU_CLONES void gru_row_backward(float* ax, float* ah, const float* h_prev, float* dh,
                                      const float* dh_head, int64_t H) {
  float* const arrays[9] = {ax, ax + H, ax + 2 * H, ah, ah + H, ah + 2 * H,
                            const_cast<float*>(h_prev), dh, const_cast<float*>(dh_head)};
  for_lanes<9, GruBackwardLanes>(arrays, H);
}

// hx holds every step's recurrent GEMM input [h_{t-1} | 1] (KH = H + 1 floats a row), so
// that one product with whb = [W_hh | b_hh] gives ah = h W_hh^T + b_hh, and one product
// dAh^T hx gives W_hh's and b_hh's gradients (dwhb).
struct GruLayout {
  int64_t ax, ah, hx, pred, dhead, dh, whb, dwhb, total;
};

GruLayout gru_layout(int64_t T, int64_t B, int64_t H, int64_t O, int per_step) {
  const int64_t G = 3 * H, KH = H + 1, P = per_step ? T * B : B;
  GruLayout l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;  // 64-byte aligned sub-buffers
    return at;
  };
  l.ax = take(T * B * G);
  l.ah = take(T * B * G);
  l.hx = take((T + 1) * B * KH);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dh = take(B * H);
  l.whb = take(G * KH);
  l.dwhb = take(G * KH);
  l.total = off;
  return l;
}

// rows [R, G] += bias [G], row by row
void add_bias_rows(float* rows, int64_t R, int64_t G, const float* bias) {
  for_each(R, R * G >= kParallelMin, [&](int64_t r) {
    for (int64_t j = 0; j < G; ++j) rows[r * G + j] += bias[j];
  });
}

}  // namespace

int64_t gru_segment_workspace_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                                     int per_step) {
  (void)I;
  return gru_layout(T, B, H, O, per_step).total;
}

double gru_segment_grads(const LstmSegmentArgs& a, Gemm gemm) {
  const int64_t T = a.T, B = a.B, I = a.I, H = a.H, G = 3 * H, BH = B * H;
  const int64_t KH = H + 1, BK = B * KH;
  const int64_t P = a.per_step ? T * B : B;
  const GruLayout l = gru_layout(T, B, H, a.O, a.per_step);
  float* ax = a.scratch + l.ax;
  float* ah = a.scratch + l.ah;
  float* hx = a.scratch + l.hx;
  float* dh = a.scratch + l.dh;
  float* whb = a.scratch + l.whb;
  float* dwhb = a.scratch + l.dwhb;

  // ---- forward ---------------------------------------------------------------------
  for (int64_t j = 0; j < G; ++j) {
    memcpy(whb + j * KH, a.w_hh + j * H, sizeof(float) * H);
    whb[j * KH + H] = a.b_hh[j];
  }
  for (int64_t r = 0; r < (T + 1) * B; ++r) hx[r * KH + H] = 1.f;
  copy_rows(hx, KH, a.h0, H, B, H);
  call(gemm, 0, 1, T * B, G, I, a.x, I, a.w_ih, I, 0.f, ax, G);  // x W_ih^T, every step
  add_bias_rows(ax, T * B, G, a.b_ih);
  const Rhs w_fwd = prepare_rhs(gemm, 0, T, 1, G, KH, B, whb, KH);  // ah = hx whb^T
  for (int64_t t = 0; t < T; ++t) {
    float* axt = ax + t * B * G;
    float* aht = ah + t * B * G;
    const float* h_prev = hx + t * BK;
    float* h_new = hx + (t + 1) * BK;
    call(gemm, w_fwd, B, h_prev, KH, 0.f, aht, G);
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gru_row_forward(axt + b * G, aht + b * G, h_prev + b * KH, h_new + b * KH, H);
    });
  }
  copy_rows(a.h_out, H, hx + T * BK, KH, B, H);
  if (a.h_seq) copy_rows(a.h_seq, H, hx + BK, KH, T * B, H);
  if (a.forward_only) return 0.0;

  // ---- head and loss (a lower layer of a stack: dh_seq from the layer above instead) ---
  double loss = 0.0;
  float* dhead = a.scratch + l.dhead;
  if (!a.skip_head)
    loss = head_and_loss(a, gemm, a.per_step ? hx + BK : hx + T * BK, KH, P, a.scratch + l.pred,
                         dhead);

  // ---- backward through the segment --------------------------------------------------
  memset(dh, 0, sizeof(float) * BH);
  const Rhs w_bwd = prepare_rhs(gemm, 1, T - 1, 0, H, G, B, a.w_hh, H);  // + dAh W_hh
  for (int64_t t = T - 1; t >= 0; --t) {
    float* axt = ax + t * B * G;
    float* aht = ah + t * B * G;
    const float* h_prev = hx + t * BK;
    const float* dh_head = a.skip_head ? a.dh_seq + t * BH
                           : a.per_step ? dhead + t * BH
                                        : (t == T - 1 ? dhead : nullptr);
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gru_row_backward(axt + b * G, aht + b * G, h_prev + b * KH, dh + b * H,
                       dh_head ? dh_head + b * H : nullptr, H);
    });
    if (t > 0) call(gemm, w_bwd, B, aht, G, 1.f, dh, H);
  }

  // ---- parameter gradients over all steps at once ---------------------------------------
  call(gemm, 1, 0, G, I, T * B, ax, G, a.x, I, 0.f, a.g_w_ih, I);  // dAx^T x_t
  call(gemm, 1, 0, G, KH, T * B, ah, G, hx, KH, 0.f, dwhb, KH);   // dAh^T [h_{t-1} | 1]
  for (int64_t j = 0; j < G; ++j) {
    memcpy(a.g_w_hh + j * H, dwhb + j * KH, sizeof(float) * H);
    a.g_b_hh[j] = dwhb[j * KH + H];
  }
  column_sums(ax, T * B, G, a.g_b_ih);
  if (a.dx) call(gemm, 0, 0, T * B, I, G, ax, G, a.w_ih, I, 0.f, a.dx, I);  // dAx W_ih
  return loss;
}

}  // namespace cpu
}  // namespace fptt
