// The FPTT GRU segment step on CUDA: forward, head and loss, backward through the segment,
// parameter gradients and the fused FPTT update in ONE cooperative kernel launch: the
// LSTM general kernel's structure (lstm_segment.cu, its shared pieces in
// segment_common.cuh) with nn.GRU's cell (gru_math.h). No torch headers:
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/gru_segment.cu
// Compile-checked only (no GPU run yet); not bound into fptt_fast._C. Design:
// docs/KERNELS.md#csrccudagru_segmentcu
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "fptt_fast/cuda_gru.h"
#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/cuda_lstm.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/gru_math.h"
#include "coresident.cuh"
#include "fused_update_device.cuh"
#include "segment_common.cuh"

namespace fptt {
namespace cuda {
namespace {

// Offsets (in floats) of the scratch arrays, 16-float aligned. G = 3H.
struct GruScratch {
  int64_t ax;       // [T, B, G] x W_ih^T + b_ih; then the gates r, z, n; then d ax
  int64_t ah;       // [T, B, G] its n block: h W_hn^T + b_hn per step; then d ah
  int64_t whhT;     // [H, G]    W_hh transposed
  int64_t hs;       // [T+1, B, H]
  int64_t pred;     // [P, O]
  int64_t dhead;    // [P, H]
  int64_t dhd;      // [B, H]   the direct part of dh_{t-1}: dh' z
  int64_t rowloss;  // [P] doubles
  int64_t total;
};

__host__ __device__ inline GruScratch gru_scratch(int64_t T, int64_t B, int64_t H, int64_t O,
                                                  int per_step) {
  const int64_t G = 3 * H, P = per_step ? T * B : B;
  GruScratch l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;
    return at;
  };
  l.ax = take(T * B * G);
  l.ah = take(T * B * G);
  l.whhT = take(H * G);
  l.hs = take((T + 1) * B * H);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dhd = take(B * H);
  l.rowloss = take(2 * P);
  l.total = off;
  return l;
}

template <int OPT>
__global__ void __launch_bounds__(kThreads, kSegmentMinBlocksPerSM)
gru_segment_kernel(LstmSegmentArgs a, UpdateTable table, float clip, float* __restrict__ status) {
  __shared__ GemmShared gsh;
  __shared__ UpdateShared ush;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();

  const int64_t T = a.T, B = a.B, I = a.I, H = a.H, G = 3 * H, BH = B * H;
  const int64_t P = a.per_step ? T * B : B;
  const GruScratch L = gru_scratch(T, B, H, a.O, a.per_step);
  // written in this kernel: no __restrict__ (lstm_segment.cu says why)
  float* ax = a.scratch + L.ax;
  float* ah = a.scratch + L.ah;
  float* whhT = a.scratch + L.whhT;
  float* hs = a.scratch + L.hs;
  float* dhd = a.scratch + L.dhd;
  const float* w_hh = a.w_hh;
  const int64_t tiles_j = (H + 31) / 32, state_tiles = (B + kStepRows - 1) / kStepRows * tiles_j;
  const int64_t sj = threadIdx.x & 31, sb = threadIdx.x >> 5;
  const int64_t tid0 = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;

  // ---- P0: initial state, W_hh^T, input projection of all steps ----------------------
  for (int64_t e = tid0; e < BH; e += stride) hs[e] = a.h0[e];
  for (int64_t e = tid0; e < G * H; e += stride) {
    const int64_t k = e / G, r = e - k * G;
    whhT[e] = w_hh[r * H + k];
  }
  gemm_tiles<false, true>(T * B, G, I, a.x, I, a.w_ih, I, ax, G, a.b_ih, nullptr, gsh);
  grid.sync();

  // ---- F_t: one state element (b, j) per thread -----------------------------------------
  for (int64_t t = 0; t < T; ++t) {
    const float* h_prev = hs + t * BH;
    for (int64_t tl = blockIdx.x; tl < state_tiles; tl += gridDim.x) {
      const int64_t b = tl / tiles_j * kStepRows + sb, j = tl % tiles_j * 32 + sj;
      if (b >= B || j >= H) continue;
      const int64_t e = b * H + j;
      const float* hp = h_prev + b * H;
      const float* wt = whhT + j;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f;
      for (int64_t k = 0; k < H; ++k) {
        const float hk = hp[k];
        const float* w = wt + k * G;
        s0 = fmaf(hk, w[0], s0);
        s1 = fmaf(hk, w[H], s1);
        s2 = fmaf(hk, w[2 * H], s2);
      }
      float* row = ax + (t * B + b) * G;
      const float ah_n = s2 + a.b_hh[2 * H + j];
      const gru::GruForwardT<float> f =
          gru::cell_forward(row[j], row[H + j], row[2 * H + j], s0 + a.b_hh[j],
                            s1 + a.b_hh[H + j], ah_n, hp[j]);
      row[j] = f.r;
      row[H + j] = f.z;
      row[2 * H + j] = f.n;
      ah[(t * B + b) * G + 2 * H + j] = ah_n;
      hs[(t + 1) * BH + e] = f.h;
      if (a.h_seq) a.h_seq[t * BH + e] = f.h;
      if (t == T - 1) a.h_out[e] = f.h;
    }
    grid.sync();
  }
  if (a.forward_only) {
    if (tid0 == 0) *a.loss_out = 0.f;
    return;
  }

  // ---- H1-H3: head, loss, head gradients (a lower layer of a stack: dh_seq instead) ----
  float* dhead = a.scratch + L.dhead;
  if (a.skip_head) {
    if (tid0 == 0) *a.loss_out = 0.f;
  } else {
    head_phase(a, a.per_step ? hs + BH : hs + T * BH, P, a.scratch + L.pred, dhead,
               reinterpret_cast<double*>(a.scratch + L.rowloss), gsh, grid);
  }

  // ---- B_t: backward; d ax and d ah overwrite the gates and ah_n in place --------------
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* dh_head = a.skip_head ? a.dh_seq + t * BH
                           : a.per_step ? dhead + t * BH
                                        : (t == T - 1 ? dhead : nullptr);
    for (int64_t tl = blockIdx.x; tl < state_tiles; tl += gridDim.x) {
      const int64_t b = tl / tiles_j * kStepRows + sb, j = tl % tiles_j * 32 + sj;
      if (b >= B || j >= H) continue;
      const int64_t e = b * H + j;
      float dh = dh_head ? dh_head[e] : 0.f;
      if (t < T - 1) {  // from step t+1: dh' z (its direct part) + dAh_{t+1}[b, :] W_hh[:, j]
        const float* dg = ah + ((t + 1) * B + b) * G;
        const float* w = w_hh + j;
        float s = 0.f;
        for (int64_t r = 0; r < G; ++r) s = fmaf(dg[r], w[r * H], s);
        dh = s + dhd[e] + dh;
      }
      float* row = ax + (t * B + b) * G;
      float* arow = ah + (t * B + b) * G;
      const gru::GruBackwardT<float> d = gru::cell_backward(
          row[j], row[H + j], row[2 * H + j], arow[2 * H + j], hs[t * BH + e], dh);
      row[j] = d.d_ar;
      row[H + j] = d.d_az;
      row[2 * H + j] = d.d_an;
      arow[j] = d.d_ar;
      arow[H + j] = d.d_az;
      arow[2 * H + j] = d.d_ahn;
      dhd[e] = d.dh_prev;
    }
    grid.sync();
  }

  // ---- G: weight gradients over all steps, a stacked layer's dx -------------------------
  const int64_t next_h =
      gemm_tiles<true, false>(G, H, T * B, ah, G, hs, H, a.g_w_hh, H, nullptr, nullptr, gsh);
  const int64_t next_x = gemm_tiles<true, false>(G, I, T * B, ax, G, a.x, I, a.g_w_ih, I,
                                                 nullptr, nullptr, gsh, next_h);
  if (a.dx)
    gemm_tiles<false, false>(T * B, I, G, ax, G, a.w_ih, I, a.dx, I, nullptr, nullptr, gsh,
                             next_x);
  column_sums(ax, T * B, G, a.g_b_ih, nullptr);
  column_sums(ah, T * B, G, a.g_b_hh, nullptr);
  if (table.n_slots == 0) return;  // gradients only (no update table)
  grid.sync();

  // ---- U: the fused FPTT update ----------------------------------------------------------
  fused_update_phases<OPT>(table, clip, status, ush);
}

struct Kernels {  // coresident.cuh's kernel_for_optimizer
  template <int OPT>
  static const void* ptr() { return reinterpret_cast<const void*>(&gru_segment_kernel<OPT>); }
};

CoresidentCap g_cap;

}  // namespace

int64_t gru_scratch_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                           int per_step) {
  (void)I;
  return gru_scratch(T, B, H, O, per_step).total;
}

int launch_gru_segment(const LstmSegmentArgs& args, const UpdateTable& table, int optimizer,
                       float clip, float* status, int device, void* stream) {
  return launch_segment(g_cap, kernel_for_optimizer<Kernels>(optimizer), /*cell_state=*/false,
                        args, table, optimizer, clip, status, device, stream);
}

}  // namespace cuda
}  // namespace fptt
