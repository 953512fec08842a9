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

struct GruLayout {
  int64_t ax, ah, hs, pred, dhead, dh, total;
};

GruLayout gru_layout(int64_t T, int64_t B, int64_t H, int64_t O, int per_step) {
  const int64_t G = 3 * H, P = per_step ? T * B : B;
  GruLayout l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;  // 64-byte aligned sub-buffers
    return at;
  };
  l.ax = take(T * B * G);
  l.ah = take(T * B * G);
  l.hs = take((T + 1) * B * H);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dh = take(B * H);
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
  const int64_t P = a.per_step ? T * B : B;
  const GruLayout l = gru_layout(T, B, H, a.O, a.per_step);
  float* ax = a.scratch + l.ax;
  float* ah = a.scratch + l.ah;
  float* hs = a.scratch + l.hs;
  float* dh = a.scratch + l.dh;

  // ---- forward ---------------------------------------------------------------------
  memcpy(hs, a.h0, sizeof(float) * BH);
  call(gemm, 0, 1, T * B, G, I, a.x, I, a.w_ih, I, 0.f, ax, G);  // x W_ih^T, every step
  add_bias_rows(ax, T * B, G, a.b_ih);
  for (int64_t t = 0; t < T; ++t) {
    float* axt = ax + t * B * G;
    float* aht = ah + t * B * G;
    const float* h_prev = hs + t * BH;
    float* h_new = hs + (t + 1) * BH;
    for (int64_t b = 0; b < B; ++b) memcpy(aht + b * G, a.b_hh, sizeof(float) * G);
    call(gemm, 0, 1, B, G, H, h_prev, H, a.w_hh, H, 1.f, aht, G);  // + h W_hh^T
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gru_row_forward(axt + b * G, aht + b * G, h_prev + b * H, h_new + b * H, H);
    });
  }
  memcpy(a.h_out, hs + T * BH, sizeof(float) * BH);
  if (a.h_seq) memcpy(a.h_seq, hs + BH, sizeof(float) * T * BH);
  if (a.forward_only) return 0.0;

  // ---- head and loss (a lower layer of a stack: dh_seq from the layer above instead) ---
  double loss = 0.0;
  float* dhead = a.scratch + l.dhead;
  if (!a.skip_head)
    loss = head_and_loss(a, gemm, a.per_step ? hs + BH : hs + T * BH, H, P, a.scratch + l.pred,
                         dhead);

  // ---- backward through the segment --------------------------------------------------
  memset(dh, 0, sizeof(float) * BH);
  for (int64_t t = T - 1; t >= 0; --t) {
    float* axt = ax + t * B * G;
    float* aht = ah + t * B * G;
    const float* h_prev = hs + t * BH;
    const float* dh_head = a.skip_head ? a.dh_seq + t * BH
                           : a.per_step ? dhead + t * BH
                                        : (t == T - 1 ? dhead : nullptr);
    for_each(B, BH >= kParallelMin / 4, [&](int64_t b) {
      gru_row_backward(axt + b * G, aht + b * G, h_prev + b * H, dh + b * H,
                       dh_head ? dh_head + b * H : nullptr, H);
    });
    if (t > 0) call(gemm, 0, 0, B, H, G, aht, G, a.w_hh, H, 1.f, dh, H);  // + dAh W_hh
  }

  // ---- parameter gradients over all steps at once ---------------------------------------
  call(gemm, 1, 0, G, I, T * B, ax, G, a.x, I, 0.f, a.g_w_ih, I);  // dAx^T x_t
  call(gemm, 1, 0, G, H, T * B, ah, G, hs, H, 0.f, a.g_w_hh, H);  // dAh^T h_{t-1}
  column_sums(ax, T * B, G, a.g_b_ih);
  column_sums(ah, T * B, G, a.g_b_hh);
  if (a.dx) call(gemm, 0, 0, T * B, I, G, ax, G, a.w_ih, I, 0.f, a.dx, I);  // dAx W_ih
  return loss;
}

}  // namespace cpu
}  // namespace fptt
