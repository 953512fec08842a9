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

namespace fptt {
namespace cuda {
namespace {

// Two co-resident blocks per SM at least: at most 128 registers per thread.
constexpr int kLstmMinBlocksPerSM = 2;
constexpr int kTile = 32;  // GEMM tile (kTile x kTile outputs per block and pass)
static_assert(kThreads == 256, "the GEMM tile mapping assumes 256 threads (8 rows of 32)");
constexpr int kTileRowsPerThread = kTile * kTile / kThreads;  // 4
constexpr int kStepRows = kThreads / 32;  // batch rows of a state tile in the recurrent steps

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

struct GemmShared {
  float a[kTile][kTile + 1];  // a[kk][mm] = A(m0 + mm, k0 + kk)
  float b[kTile][kTile + 1];  // b[kk][nn] = B(k0 + kk, n0 + nn)
};

// C[M, N] = op(A) op(B) (+ bias1[n] + bias2[n]), row-major; op(A)(m, k) is A[m*lda + k],
// or A[k*lda + m] if TA; op(B)(k, n) is B[k*ldb + n], or B[n*ldb + k] if TB. Tiles of
// kTile x kTile outputs are dealt to the blocks in turn; thread (ty, tx) of a block owns
// outputs (m0 + ty + 8i, n0 + tx), i < 4, each summed over k in order (fixed, whatever the
// grid). Tile i goes to block (first_block + i) mod gridDim.x: GEMMs of one phase start
// where the previous one's tiles ended, so they run side by side. Every thread of the
// block must call it (it uses __syncthreads()). Returns first_block + the number of tiles.
template <bool TA, bool TB>
__device__ int64_t gemm_tiles(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float* C, int64_t ldc,
                              const float* bias1, const float* bias2, GemmShared& s,
                              int64_t first_block = 0) {
  const int tid = int(threadIdx.x), tx = tid & 31, ty = tid >> 5;
  const int64_t tiles_n = (N + kTile - 1) / kTile;
  const int64_t tiles = (M + kTile - 1) / kTile * tiles_n;
  const int64_t G = gridDim.x;
  for (int64_t tile = (int64_t(blockIdx.x) - first_block % G + G) % G; tile < tiles; tile += G) {
    const int64_t m0 = tile / tiles_n * kTile, n0 = tile % tiles_n * kTile;
    float acc[kTileRowsPerThread];
#pragma unroll
    for (int i = 0; i < kTileRowsPerThread; ++i) acc[i] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
#pragma unroll
      for (int q = 0; q < kTileRowsPerThread; ++q) {
        // the fast index runs along the stored rows, so the loads are coalesced
        const int idx = tid + q * kThreads, fast = idx & 31, slow = idx >> 5;
        {
          const int kk = TA ? slow : fast, mm = TA ? fast : slow;
          const int64_t m = m0 + mm, k = k0 + kk;
          s.a[kk][mm] = (m < M && k < K) ? (TA ? A[k * lda + m] : A[m * lda + k]) : 0.f;
        }
        {
          const int kk = TB ? fast : slow, nn = TB ? slow : fast;
          const int64_t n = n0 + nn, k = k0 + kk;
          s.b[kk][nn] = (n < N && k < K) ? (TB ? B[n * ldb + k] : B[k * ldb + n]) : 0.f;
        }
      }
      __syncthreads();
      const int kmax = K - k0 < kTile ? int(K - k0) : kTile;
      for (int kk = 0; kk < kmax; ++kk) {
        const float bv = s.b[kk][tx];
#pragma unroll
        for (int i = 0; i < kTileRowsPerThread; ++i) acc[i] = fmaf(s.a[kk][ty + 8 * i], bv, acc[i]);
      }
      __syncthreads();
    }
    const int64_t n = n0 + tx;
    if (n < N) {
      const float bias = bias1 ? (bias2 ? bias1[n] + bias2[n] : bias1[n]) : 0.f;
#pragma unroll
      for (int i = 0; i < kTileRowsPerThread; ++i) {
        const int64_t m = m0 + ty + 8 * i;
        if (m < M) C[m * ldc + n] = bias1 ? acc[i] + bias : acc[i];
      }
    }
  }
  return first_block + tiles;
}

// out[j] (and out2[j] if given) = sum over rows r of A[r*cols + j], in order, in double.
__device__ void column_sums(const float* A, int64_t rows, int64_t cols, float* out,
                            float* out2) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < cols; j += stride) {
    double s = 0.0;
    for (int64_t r = 0; r < rows; ++r) s += double(A[r * cols + j]);
    out[j] = float(s);
    if (out2) out2[j] = float(s);
  }
}

// H2 for head row p: its loss term (rowloss[p]) and d(weight * loss)/d pred (in place),
// with the row math shared by the CUDA kernels (lstm_math.h).
__device__ void loss_row(const LstmSegmentArgs& a, int64_t p, int64_t P, float* z,
                         double* rowloss) {
  rowloss[p] = a.loss == LSTM_LOSS_MSE
                   ? lstm::mse_row(z, a.target_f + p * a.O, a.O, lstm::mse_scale(a.weight, P, a.O))
                   : lstm::ce_row(z, a.target_i[p], a.O, lstm::ce_scale(a.weight, P));
}

template <int OPT>
__global__ void __launch_bounds__(kThreads, kLstmMinBlocksPerSM)
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
    const float* h_head = a.per_step ? hs + BH : hs + T * BH;  // [P, H]
    gemm_tiles<false, true>(P, O, H, h_head, H, a.w_o, H, pred, O, a.b_o, nullptr, gsh);
    grid.sync();
    for (int64_t p = tid0; p < P; p += stride) loss_row(a, p, P, pred + p * O, rowloss);
    grid.sync();
    const int64_t next =
        gemm_tiles<false, false>(P, H, O, pred, O, a.w_o, H, dhead, H, nullptr, nullptr, gsh);
    gemm_tiles<true, false>(O, H, P, pred, O, h_head, H, a.g_w_o, H, nullptr, nullptr, gsh,
                            next);
    column_sums(pred, P, O, a.g_b_o, nullptr);
    if (tid0 == 0) {
      double s = 0.0;
      for (int64_t p = 0; p < P; ++p) s += rowloss[p];
      *a.loss_out = float(a.loss == LSTM_LOSS_MSE ? s / double(P * O) : s / double(P));
    }
    grid.sync();
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
  const LstmSegmentArgs& a = args;
  const bool head = !a.skip_head && !a.forward_only;  // the head and loss are read
  if (a.T < 1 || a.B < 1 || a.I < 1 || a.H < 1 || (head && a.O < 1) || a.H > kLstmMaxHidden ||
      (a.loss != LSTM_LOSS_MSE && a.loss != LSTM_LOSS_CE) ||
      (head && (a.loss == LSTM_LOSS_MSE ? a.target_f == nullptr : a.target_i == nullptr)) ||
      (head && (!a.w_o || !a.b_o || !a.g_w_o || !a.g_b_o)) ||
      (a.skip_head && !a.forward_only && !a.dh_seq) ||
      !a.x || !a.h0 || !a.c0 || !a.w_ih || !a.w_hh || !a.b_ih || !a.b_hh ||
      !a.g_w_ih || !a.g_w_hh || !a.g_b_ih || !a.g_b_hh || !a.h_out ||
      !a.c_out || !a.loss_out || !a.scratch || (reinterpret_cast<uintptr_t>(a.scratch) & 15u))
    return int(cudaErrorInvalidValue);
  // an empty table (n_slots 0): gradients only; an update needs the head and the backward
  if (table.n_slots != 0 &&
      (!head || table.n_slots < 1 || table.n_chunks < table.n_slots || table.slots == nullptr ||
       table.scalars == nullptr || table.partials == nullptr || status == nullptr))
    return int(cudaErrorInvalidValue);
  int64_t grid = lstm_segment_grid_size(optimizer, device);
  if (grid < 0) return int(-grid);
  LstmSegmentArgs ka = a;
  UpdateTable t = table;
  float c = clip;
  float* st = status;
  void* kargs[] = {&ka, &t, &c, &st};
  return g_cap.launch(kernel_for(optimizer), optimizer, device, grid, kThreads, kargs,
                      static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace fptt
