// What the general CUDA segment kernels of every cell share (lstm_segment.cu,
// gru_segment.cu): the block shape, the tiled GEMM, column sums, the head and loss phase.
// Device code only, no torch headers; included by each kernel file into its anonymous
// namespace's scope (everything here is internal to the including file).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/cuda_lstm.h"
#include "fptt_fast/lstm_math.h"
#include "coresident.cuh"

namespace fptt {
namespace cuda {
namespace {

// Two co-resident blocks per SM at least: at most 128 registers per thread.
constexpr int kSegmentMinBlocksPerSM = 2;
constexpr int kTile = 32;  // GEMM tile (kTile x kTile outputs per block and pass)
static_assert(kThreads == 256, "the GEMM tile mapping assumes 256 threads (8 rows of 32)");
constexpr int kTileRowsPerThread = kTile * kTile / kThreads;  // 4
constexpr int kStepRows = kThreads / 32;  // batch rows of a state tile in the recurrent steps

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

// H1-H3 (a segment with its head): the head on h_head [P, H], each row's loss and
// d(weight * loss)/d pred (in place), dhead [P, H] = dpred W_o, the head's gradients and
// the unweighted loss into a.loss_out. Every thread of the grid calls it; it ends with a
// grid sync.
__device__ void head_phase(const LstmSegmentArgs& a, const float* h_head, int64_t P,
                           float* pred, float* dhead, double* rowloss, GemmShared& gsh,
                           cooperative_groups::grid_group& grid) {
  const int64_t H = a.H, O = a.O;
  const int64_t tid0 = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  gemm_tiles<false, true>(P, O, H, h_head, H, a.w_o, H, pred, O, a.b_o, nullptr, gsh);
  grid.sync();
  for (int64_t p = tid0; p < P; p += stride) loss_row(a, p, P, pred + p * O, rowloss);
  grid.sync();
  const int64_t next =
      gemm_tiles<false, false>(P, H, O, pred, O, a.w_o, H, dhead, H, nullptr, nullptr, gsh);
  gemm_tiles<true, false>(O, H, P, pred, O, h_head, H, a.g_w_o, H, nullptr, nullptr, gsh, next);
  column_sums(pred, P, O, a.g_b_o, nullptr);
  if (tid0 == 0) {
    double s = 0.0;
    for (int64_t p = 0; p < P; ++p) s += rowloss[p];
    *a.loss_out = float(a.loss == LSTM_LOSS_MSE ? s / double(P * O) : s / double(P));
  }
  grid.sync();
}

// Whether a launch's arguments are usable (the glue checked the tensors; this guards the
// plain-C++ API): sizes, codes, the pointers the launch reads or writes (c0 and c_out only
// for a cell with a cell state; the head's only with the head), a 16-byte aligned
// scratch, and an update table that is empty (gradients only) or complete.
inline bool launch_args_valid(const LstmSegmentArgs& a, const UpdateTable& table,
                              const float* status, bool cell_state) {
  const bool head = !a.skip_head && !a.forward_only;  // the head and loss are read
  if (a.T < 1 || a.B < 1 || a.I < 1 || a.H < 1 || (head && a.O < 1) || a.H > kLstmMaxHidden ||
      (a.loss != LSTM_LOSS_MSE && a.loss != LSTM_LOSS_CE) ||
      (head && (a.loss == LSTM_LOSS_MSE ? a.target_f == nullptr : a.target_i == nullptr)) ||
      (head && (!a.w_o || !a.b_o || !a.g_w_o || !a.g_b_o)) ||
      (a.skip_head && !a.forward_only && !a.dh_seq) || (cell_state && (!a.c0 || !a.c_out)) ||
      !a.x || !a.h0 || !a.w_ih || !a.w_hh || !a.b_ih || !a.b_hh || !a.g_w_ih || !a.g_w_hh ||
      !a.g_b_ih || !a.g_b_hh || !a.h_out || !a.loss_out || !a.scratch ||
      (reinterpret_cast<uintptr_t>(a.scratch) & 15u))
    return false;
  // an empty table (n_slots 0): gradients only; an update needs the head and the backward
  return table.n_slots == 0 ||
         (head && table.n_slots >= 1 && table.n_chunks >= table.n_slots &&
          table.slots != nullptr && table.scalars != nullptr && table.partials != nullptr &&
          status != nullptr);
}

// One cooperative launch of a segment kernel (`kernel`: its variant for `optimizer`) on
// the co-resident grid `cap` reports, after launch_args_valid. 0 or a cudaError_t code.
inline int launch_segment(CoresidentCap& cap, const void* kernel, bool cell_state,
                          const LstmSegmentArgs& args, const UpdateTable& table, int optimizer,
                          float clip, float* status, int device, void* stream) {
  if (kernel == nullptr || !launch_args_valid(args, table, status, cell_state))
    return int(cudaErrorInvalidValue);
  const int64_t grid = cap.get(kernel, optimizer, device, kThreads);
  if (grid < 0) return int(-grid);
  LstmSegmentArgs ka = args;
  UpdateTable t = table;
  float c = clip;
  float* st = status;
  void* kargs[] = {&ka, &t, &c, &st};
  return cap.launch(kernel, optimizer, device, grid, kThreads, kargs,
                    static_cast<cudaStream_t>(stream));
}

}  // namespace
}  // namespace cuda
}  // namespace fptt
