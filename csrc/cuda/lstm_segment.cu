// The FPTT LSTM segment step on CUDA: forward, head and loss, backward through the segment,
// parameter gradients and the fused FPTT update, in ONE cooperative kernel launch, called
// by csrc/cuda_glue/lstm_cuda.cpp. No torch headers: this file builds with plain
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/lstm_segment.cu
// API and argument shapes: csrc/include/fptt_fast/cuda_lstm.h. Pointwise LSTM math:
// lstm_math.h (shared with the CPU step); the update: fused_update_device.cuh (shared
// with fused_update.cu). Contracts: no atomics, results independent of the grid size;
// fp32 IEEE FMA throughout. Design: docs/KERNELS.md#csrccudalstm_segmentcu
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <mutex>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/cuda_lstm.h"
#include "coresident.cuh"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_math.h"
#include "fused_update_device.cuh"
#include "segment_common.cuh"

namespace fptt {
namespace cuda {
namespace {

// Offsets (in floats) of the scratch arrays. All 16-float (64-byte) aligned.
struct ScratchLayout {
  int64_t gx;       // [T, B, G]  x W_ih^T + b; then the activated gates; then their gradients
  int64_t whhT;     // [H, G]     W_hh transposed
  int64_t hs;       // [T+1, B, H]  h_{-1} = h0, h_0 .. h_{T-1}
  int64_t cs;       // [T+1, B, H]  likewise c
  int64_t pred;     // [P, O]     head outputs, then d(weight * loss)/d pred
  int64_t dhead;    // [P, H]     gradient on the head's hidden states
  int64_t dc;       // [B, H]     gradient on c_{t} carried backwards
  int64_t rowloss;  // [P] doubles (2P floats): loss term of each head row
  int64_t total;
};

__host__ __device__ inline ScratchLayout scratch_layout(int64_t T, int64_t B, int64_t H,
                                                        int64_t O, int per_step) {
  const int64_t G = 4 * H, P = per_step ? T * B : B;
  ScratchLayout l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;
    return at;
  };
  l.gx = take(T * B * G);
  l.whhT = take(H * G);
  l.hs = take((T + 1) * B * H);
  l.cs = take((T + 1) * B * H);
  l.pred = take(P * O);
  l.dhead = take(P * H);
  l.dc = take(B * H);
  l.rowloss = take(2 * P);
  l.total = off;
  return l;
}

template <int OPT>
__global__ void __launch_bounds__(kThreads, kSegmentMinBlocksPerSM)
lstm_segment_kernel(LstmSegmentArgs a, UpdateTable table, float clip,
                    float* __restrict__ status) {
  __shared__ GemmShared gsh;
  __shared__ UpdateShared ush;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();

  const int64_t T = a.T, B = a.B, I = a.I, H = a.H, O = a.O, G = 4 * H, BH = B * H;
  const int64_t P = a.per_step ? T * B : B;
  const ScratchLayout L = scratch_layout(T, B, H, O, a.per_step);
  // No __restrict__ on anything this kernel writes (scratch, gradients): a const
  // __restrict__ pointer lets the compiler use the non-coherent read-only path
  // (ld.global.nc), which may return stale lines for data written earlier in the same
  // kernel by another block. Plain loads after grid.sync() are coherent.
  float* gx = a.scratch + L.gx;
  float* whhT = a.scratch + L.whhT;
  float* hs = a.scratch + L.hs;
  float* cs = a.scratch + L.cs;
  float* pred = a.scratch + L.pred;
  float* dhead = a.scratch + L.dhead;
  float* dc = a.scratch + L.dc;
  double* rowloss = reinterpret_cast<double*>(a.scratch + L.rowloss);
  const float* w_hh = a.w_hh;  // read before the update phase writes it
  // Recurrent steps: state tiles of kStepRows batch rows x 32 columns, one per block and
  // pass (thread (ty, tx) owns element (b0 + ty, j0 + tx)). A warp reads 32 neighbouring
  // columns of W_hh^T (coalesced); the block's 8 warps read the same lines (L1 reuse).
  const int64_t tiles_j = (H + 31) / 32, state_tiles = (B + kStepRows - 1) / kStepRows * tiles_j;
  const int64_t sj = threadIdx.x & 31, sb = threadIdx.x >> 5;
  const int64_t tid0 = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;

  // ---- P0: initial state, W_hh^T, input projection of all steps ----------------------
  for (int64_t e = tid0; e < BH; e += stride) {
    hs[e] = a.h0[e];
    cs[e] = a.c0[e];
  }
  for (int64_t e = tid0; e < G * H; e += stride) {  // coalesced writes, strided reads
    const int64_t k = e / G, r = e - k * G;
    whhT[e] = w_hh[r * H + k];
  }
  gemm_tiles<false, true>(T * B, G, I, a.x, I, a.w_ih, I, gx, G, a.b_ih, a.b_hh, gsh);
  grid.sync();

  // ---- F_t: forward, one state element (b, j) per thread, in state tiles ---------------
  for (int64_t t = 0; t < T; ++t) {
    const float* h_prev = hs + t * BH;
    const float* c_prev = cs + t * BH;
    for (int64_t tl = blockIdx.x; tl < state_tiles; tl += gridDim.x) {
      const int64_t b = tl / tiles_j * kStepRows + sb, j = tl % tiles_j * 32 + sj;
      if (b >= B || j >= H) continue;
      const int64_t e = b * H + j;
      const float* hp = h_prev + b * H;
      const float* wt = whhT + j;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int64_t k = 0; k < H; ++k) {
        const float hk = hp[k];
        const float* w = wt + k * G;
        s0 = fmaf(hk, w[0], s0);
        s1 = fmaf(hk, w[H], s1);
        s2 = fmaf(hk, w[2 * H], s2);
        s3 = fmaf(hk, w[3 * H], s3);
      }
      float* row = gx + (t * B + b) * G;
      const lstm::CellForward f =
          lstm::cell_forward(row[j] + s0, row[H + j] + s1, row[2 * H + j] + s2,
                             row[3 * H + j] + s3, c_prev[e]);
      row[j] = f.i;
      row[H + j] = f.f;
      row[2 * H + j] = f.g;
      row[3 * H + j] = f.o;
      hs[(t + 1) * BH + e] = f.h;
      cs[(t + 1) * BH + e] = f.c;
      if (a.h_seq) a.h_seq[t * BH + e] = f.h;
      if (t == T - 1) {
        a.h_out[e] = f.h;
        a.c_out[e] = f.c;
      }
    }
    grid.sync();
  }
  if (a.forward_only) {  // a lower layer's forward: its outputs feed the layer above
    if (tid0 == 0) *a.loss_out = 0.f;
    return;
  }

  // ---- H1-H3: head, loss, head gradients (a lower layer of a stack: dh_seq instead) ----
  if (a.skip_head) {
    if (tid0 == 0) *a.loss_out = 0.f;
  } else {
    head_phase(a, a.per_step ? hs + BH : hs + T * BH, P, pred, dhead, rowloss, gsh, grid);
  }

  // ---- B_t: backward through the segment -----------------------------------------------
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* dh_head = a.skip_head ? a.dh_seq + t * BH
                           : a.per_step ? dhead + t * BH
                                        : (t == T - 1 ? dhead : nullptr);
    for (int64_t tl = blockIdx.x; tl < state_tiles; tl += gridDim.x) {
      const int64_t b = tl / tiles_j * kStepRows + sb, j = tl % tiles_j * 32 + sj;
      if (b >= B || j >= H) continue;
      const int64_t e = b * H + j;
      float dh = dh_head ? dh_head[e] : 0.f;
      float dc_next = 0.f;
      if (t < T - 1) {  // recurrent gradient from step t+1: dG_{t+1}[b, :] W_hh[:, j]
        const float* dg = gx + ((t + 1) * B + b) * G;
        const float* w = w_hh + j;
        float s = 0.f;
        for (int64_t r = 0; r < G; ++r) s = fmaf(dg[r], w[r * H], s);
        dh = s + dh;
        dc_next = dc[e];
      }
      float* row = gx + (t * B + b) * G;
      const lstm::CellBackward d =
          lstm::cell_backward(row[j], row[H + j], row[2 * H + j], row[3 * H + j],
                              cs[(t + 1) * BH + e], cs[t * BH + e], dh, dc_next);
      row[j] = d.d_ai;
      row[H + j] = d.d_af;
      row[2 * H + j] = d.d_ag;
      row[3 * H + j] = d.d_ao;
      dc[e] = d.dc_prev;
    }
    grid.sync();
  }

  // ---- G: weight gradients over all steps ------------------------------------------------
  const int64_t next_g =
      gemm_tiles<true, false>(G, H, T * B, gx, G, hs, H, a.g_w_hh, H, nullptr, nullptr, gsh);
  const int64_t next_x = gemm_tiles<true, false>(G, I, T * B, gx, G, a.x, I, a.g_w_ih, I,
                                                 nullptr, nullptr, gsh, next_g);
  if (a.dx)  // the gradient on x, for the layer below: dG W_ih (before the update writes W_ih)
    gemm_tiles<false, false>(T * B, I, G, gx, G, a.w_ih, I, a.dx, I, nullptr, nullptr, gsh,
                             next_x);
  column_sums(gx, T * B, G, a.g_b_ih, a.g_b_hh);
  if (table.n_slots == 0) return;  // gradients only (no update table)
  grid.sync();

  // ---- U: the fused FPTT update of the six parameters ----------------------------------
  fused_update_phases<OPT>(table, clip, status, ush);
}

struct Kernels {  // coresident.cuh's kernel_for_optimizer
  template <int OPT>
  static const void* ptr() { return reinterpret_cast<const void*>(&lstm_segment_kernel<OPT>); }
};

const void* kernel_for(int optimizer) { return kernel_for_optimizer<Kernels>(optimizer); }

CoresidentCap g_cap;  // co-resident blocks per device and optimizer (coresident.cuh)

}  // namespace

int64_t lstm_scratch_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                            int per_step) {
  (void)I;
  return scratch_layout(T, B, H, O, per_step).total;
}

int64_t lstm_segment_grid_size(int optimizer, int device) {
  if (optimizer < OPT_SGD || optimizer > OPT_ADAMW) return -int64_t(cudaErrorInvalidValue);
  return g_cap.get(kernel_for(optimizer), optimizer, device, kThreads);
}

int launch_lstm_segment(const LstmSegmentArgs& args, const UpdateTable& table, int optimizer,
                        float clip, float* status, int device, void* stream) {
  return launch_segment(g_cap, kernel_for(optimizer), /*cell_state=*/true, args, table,
                        optimizer, clip, status, device, stream);
}

}  // namespace cuda
}  // namespace fptt
