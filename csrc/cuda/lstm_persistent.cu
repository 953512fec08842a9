// The weight-stationary persistent FPTT LSTM kernel: a whole batch of K FPTT segments
// (forward, head and loss, backward, gradients, clip and the FPTT update, then the next
// segment from the updated weights) in ONE launch, called by csrc/cuda_glue/lstm_cuda.cpp.
// No torch headers: this file builds with plain
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/lstm_persistent.cu
// API: csrc/include/fptt_fast/cuda_lstm.h (lstm_persistent_*); shapes it cannot hold take
// the general kernel (lstm_segment.cu). Contracts: thread-block clusters, weights in
// registers, no grid-wide barrier per step; bitwise reproducible run to run on one device.
// Design: docs/KERNELS.md#csrccudalstm_persistentcu
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <mutex>
#include <type_traits>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/cuda_lstm.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_math.h"
#include "fused_update_device.cuh"

namespace cg = cooperative_groups;

namespace fptt {
namespace cuda {
namespace {

constexpr int kUnits = 16;   // hidden units per CTA
constexpr int kSlices = 16;  // threads per unit (k-slices)
static_assert(kUnits * kSlices == kThreads, "a CTA is 16 units x 16 slices = kThreads");
constexpr int kXPer = kPersistMaxInput / kSlices;  // inputs per slice (2)
static_assert(kPersistMaxInput % kSlices == 0, "inputs are dealt evenly to the slices");

// Thread (u, s) of a unit holds the m-th element k = m * 16 + s of a row dealt to its 16
// slices (interleaved). The shared arrays the products read are stored "by element, then
// batch row" ([k][b], row stride R = MAXB + 4 floats): a thread reads 4 batch rows of one
// element as one float4 (16 FMAs: 4 gates x 4 rows), and the 16 lanes' rows k = m*16 + s
// land, with the stride of R floats, on distinct banks (2 wavefronts per 256 bytes).
__device__ __forceinline__ int slice_index(int s, int m) { return m * 16 + s; }

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// The two halves of a cluster barrier (cluster.sync() is both): release on arrival (this
// thread's shared, distributed-shared and global writes before it are visible to the
// cluster once everyone has arrived), acquire on the wait. Every thread runs them.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Sum over the 16 lanes of a half-warp of v[b * W + w] (b < MAXB, w < W), in a fixed tree.
// Levels xor 8, 4, 2, 1: while a lane holds several batch rows it keeps half of them
// (recursive halving: the upper lane of each pair keeps the upper half), then the pair
// exchanges everything (butterfly). Afterwards v[0..W) of lane s holds the complete sums of
// batch row s >> (4 - log2 MAXB); both lanes of a butterfly pair hold the same bits.
// (Template recursion rather than a loop over the levels: with a loop nvcc keeps v in
// local memory.)
template <int ROWS, int W, int OFF>
struct SliceLevel {
  template <int N>
  __device__ __forceinline__ static void run(float (&v)[N], int s) {
    if constexpr (ROWS >= 2) {
      constexpr int half = ROWS / 2 * W;
      const bool up = (s & OFF) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const float send = up ? v[i] : v[i + half];
        const float keep = up ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], OFF);
    }
    if constexpr (OFF > 1) SliceLevel<(ROWS >= 2 ? ROWS / 2 : 1), W, OFF / 2>::run(v, s);
  }
};

template <int MAXB, int W>
__device__ __forceinline__ void slice_reduce(float (&v)[MAXB * W], int s) {
  SliceLevel<MAXB, W, 8>::run(v, s);
}

// f(std::integral_constant<int, b>) for the compile-time rows b in [LO, HI): the row
// loops stay unrolled (register arrays indexed by constants) while a caller can skip
// whole ranges of rows with a run-time test around the call.
template <int LO, int HI, class F>
__device__ __forceinline__ void for_rows(F&& f) {
  if constexpr (LO < HI) {
    f(std::integral_constant<int, LO>{});
    for_rows<LO + 1, HI>(f);
  }
}

// f(std::integral_constant<int, q>) for the quads of batch rows [4q, 4q + 4) that can hold
// data when the cluster has nb rows (rows >= nb hold zeros, so skipping them changes
// nothing; it saves their FMAs when B does not fill the clusters, e.g. 9 rows of 16).
// Template recursion keeps the code unrolled; the test per quad is uniform in the CTA.
template <int MAXB, class F>
__device__ __forceinline__ void for_live_quads(int nb, F&& f) {
  for_rows<0, MAXB / 4>([&](auto qc) {
    constexpr int q = decltype(qc)::value;
    if (q == 0 || nb > 4 * q) f(qc);
  });
}

template <int MAXB>
__device__ __forceinline__ int row_of_lane(int s) {
  return MAXB == 16 ? s : (MAXB == 8 ? s >> 1 : -1);
}
// The lane that writes batch row row_of_lane(s) (the lower lane of a butterfly pair).
template <int MAXB>
__device__ __forceinline__ bool lane_writes(int s) {
  return MAXB == 16 ? true : (s & 1) == 0;
}

// Shared memory of one CTA, in floats (all offsets multiples of 4: float4 aligned). h is
// [element][batch row] with row stride R: the 16 lanes of a unit, which hold 16 batch rows of
// one element, write 64 contiguous bytes into each CTA of the cluster. dG is [unit][batch
// row][gate]: a lane broadcasts its 4 gate gradients as one float4 per CTA. The backward's
// buffers are triple-buffered: a CTA accumulates the weight gradients of step t after it
// has arrived at the barrier of step t - 1, while the others may already write step t - 2.
template <int CL, int MAXB>
struct Smem {
  static constexpr int HP = 16 * CL;
  static constexpr int R = MAXB + 4;                              // row stride (floats)
  static constexpr int RJ = 4 * MAXB + 4;                         // dgbuf row stride (floats)
  static constexpr int hbuf = 0;                                  // [2][HP][R]   h_{t-1}
  static constexpr int dgbuf = hbuf + 2 * HP * R;                 // [3][HP][RJ]  dG_t[b][g] by unit
  static constexpr int hown = dgbuf + 3 * HP * RJ;                // [3][kUnits][R] h_{t-1}, own units
  static constexpr int xbuf = hown + 3 * kUnits * R;              // [3][kPersistMaxInput][R]
  static constexpr int wo = xbuf + 3 * kPersistMaxInput * R;      // [kPersistMaxOutput][HP]
  static constexpr int dpred = wo + kPersistMaxOutput * HP;       // [MAXB][kPersistMaxOutput]
  static constexpr int total = dpred + MAXB * kPersistMaxOutput;
  static constexpr size_t bytes = sizeof(float) * size_t(total);
};

// Global scratch of one launch, in floats; 16-float aligned parts.
struct PScratch {
  int64_t gates;    // [omega][B][H] float4 (i, f, g, o activated)   (4 floats each)
  int64_t cs;       // [omega + 1][B][H]  c_{t-1} at index t
  int64_t hs;       // [omega + 1][B][H]  h_{t-1} at index t
  int64_t dhh;      // [omega][B][H]      head gradient on h_t (per-step loss)
  int64_t part;     // [n_clusters][NP]   per-cluster gradient partial sums
  int64_t rowloss;  // [omega * B] doubles (2 floats each)
  int64_t total;
};

// Offsets of the parameters in a partial-gradient row (the update's slot order).
struct PartLayout {
  int64_t w_ih, w_hh, b, w_o, b_o, n;
};
__host__ __device__ inline PartLayout part_layout(int64_t I, int64_t H, int64_t O) {
  PartLayout p;
  const int64_t G = 4 * H;
  p.w_ih = 0;
  p.w_hh = p.w_ih + G * I;
  p.b = p.w_hh + G * H;
  p.w_o = p.b + G;
  p.b_o = p.w_o + O * H;
  p.n = p.b_o + O;
  return p;
}

__host__ __device__ inline PScratch pscratch_layout(int64_t omega, int64_t B, int64_t I,
                                                   int64_t H, int64_t O, int per_step,
                                                   int64_t n_clusters) {
  PScratch l;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += (n + 15) / 16 * 16;
    return at;
  };
  l.gates = take(omega * B * H * 4);
  l.cs = take((omega + 1) * B * H);
  l.hs = take((omega + 1) * B * H);
  l.dhh = take(per_step ? omega * B * H : 0);
  l.part = take(n_clusters * part_layout(I, H, O).n);
  l.rowloss = take(2 * (per_step ? omega * B : B));
  l.total = off;
  return l;
}

struct PKArgs {
  LstmSegmentArgs a;  // T = all steps; loss_out = [n_segs]; scratch: pscratch_layout
  int64_t n_segs, omega;
  int weight_ramp;    // 1: segment p weighs (p + 1) / n_segs; 0: a.weight
  int bpc;            // batch rows per cluster
  int n_clusters;
  int optimizer;
  long long* prof;    // null, or [kProfSlots] clock64 stamps of block 0 (tuning only)
  int debug;          // 0; tuning experiments only (kDbg* bits; most give wrong results)
};

// Tuning experiments (lstm_persistent_set_debug): time differences between variants.
enum : int {
  kDbgBarrier2 = 1,   // a second cluster barrier per step (what one barrier costs)
  kDbgNoGStore = 2,   // forward: no global stores of the cell data (wrong backward)
  kDbgNoDsmem = 4,    // broadcasts to the own CTA only (wrong)
  kDbgNoPrefetch = 8, // backward: no loads of the next step's cell data (wrong)
  kDbgAligned = 16,   // barrier.cluster.*.aligned instead of cluster.sync()
  kDbgCompute2 = 32,  // forward product twice (what the product costs; wrong)
  kDbgNoCell = 64,    // forward: no cell math (wrong)
};
int g_debug = 0;

// Tuning stamps (clock64 of block 0, thread 0) of the first kProfSegs segments: segment
// start, forward done, head done, backward done, partials written, gradients reduced,
// update done; then globaltimer/clock64 at the start and the end (for the clock rate).
constexpr int kProfSegs = 8, kProfPer = 8;
long long* g_prof = nullptr;

template <int CL, int MAXB>
__global__ void __launch_bounds__(kThreads, 1)
lstm_persistent_kernel(PKArgs k, UpdateTable table, float clip, float* __restrict__ status) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // Clusters need sm_90: builds for older targets (TORCH_CUDA_ARCH_LIST) compile an empty
  // kernel, which lstm_persistent_plan never launches on such a device.
  __trap();
#else
  using S = Smem<CL, MAXB>;
  constexpr int HP = S::HP, R = S::R, RJ = S::RJ, KH = CL, Q = MAXB / 4;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  __shared__ UpdateShared ush;
  cg::grid_group grid = cg::this_grid();
  cg::cluster_group cluster = cg::this_cluster();

  const LstmSegmentArgs& a = k.a;
  const int B = int(a.B), I = int(a.I), H = int(a.H), O = int(a.O);
  const int rank = int(cluster.block_rank());
  const int q = int(blockIdx.x) / CL;
  const int tid = int(threadIdx.x), u = tid >> 4, s = tid & 15;
  const int j = rank * kUnits + u;  // this thread's hidden unit (>= H: padding)
  const bool jvalid = j < H;
  const int b0 = q * k.bpc;
  const int nb = max(0, min(k.bpc, B - b0));  // batch rows of this cluster
  const int rb = row_of_lane<MAXB>(s);        // the batch row this lane's cell handles
  const bool owner = lane_writes<MAXB>(s) && rb < nb && jvalid;
  const PScratch L = pscratch_layout(k.omega, B, I, H, O, a.per_step, k.n_clusters);
  const PartLayout PL = part_layout(I, H, O);
  float4* gates = reinterpret_cast<float4*>(a.scratch + L.gates);
  float* cs = a.scratch + L.cs;
  float* hs = a.scratch + L.hs;
  float* dhh = a.scratch + L.dhh;
  float* part = a.scratch + L.part + int64_t(q) * PL.n;
  double* rowloss = reinterpret_cast<double*>(a.scratch + L.rowloss);
  float* hbuf = sm + S::hbuf;
  float* dgbuf = sm + S::dgbuf;
  float* hown = sm + S::hown;
#ifdef FPTT_PERSISTENT_TUNING
  const bool stamp = k.prof != nullptr && blockIdx.x == 0 && tid == 0;
  const int dbg = k.debug;
#else  // the tuning stamps and experiment bits compile out of a shipped build
  constexpr bool stamp = false;
  constexpr int dbg = 0;
#endif
  auto mark = [&](int64_t seg, int i) {
    if (stamp && seg < kProfSegs) k.prof[seg * kProfPer + i] = clock64();
  };
  if (stamp) {
    unsigned long long gt;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt));
    k.prof[kProfSegs * kProfPer] = (long long)gt;
    k.prof[kProfSegs * kProfPer + 1] = clock64();
  }
  float* xbuf = sm + S::xbuf;
  float* wo = sm + S::wo;
  float* dpred = sm + S::dpred;
  const int64_t BH = int64_t(B) * H;
  auto csync = [&]() {
    if (dbg & kDbgAligned)
      asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    else
      cluster.sync();
    if (dbg & kDbgBarrier2) cluster.sync();
  };

  // Zero this CTA's shared memory once: padding units and rows stay zero for good.
  for (int e = tid; e < S::total; e += kThreads) sm[e] = 0.f;
  __syncthreads();
  // The state entering the sequence: h into hbuf[0] (all units of the cluster's rows),
  // c and h of this lane's (row, unit) in registers.
  float c_reg = 0.f, h_reg = 0.f;
  for (int e = tid; e < nb * HP; e += kThreads) {
    const int b = e / HP, jj = e % HP;
    hbuf[jj * R + b] = jj < H ? a.h0[int64_t(b0 + b) * H + jj] : 0.f;
  }
  if (rb < nb && jvalid) {
    c_reg = a.c0[int64_t(b0 + rb) * H + j];
    h_reg = a.h0[int64_t(b0 + rb) * H + j];
  }
  cluster.sync();  // every CTA's zeroing is done before any remote write lands

  const int64_t T = a.T;
  for (int64_t p = 0; p < k.n_segs; ++p) {
    const int64_t t0 = p * k.omega;
    mark(p, 0);
    const int Tp = int(min(k.omega, T - t0));  // steps of this segment
    const float weight =
        k.weight_ramp ? float(double(p + 1) / double(k.n_segs)) : a.weight;
    const int64_t P = a.per_step ? int64_t(Tp) * B : B;  // head rows of the segment
    const float scale = a.loss == LSTM_LOSS_MSE ? lstm::mse_scale(weight, P, O)
                                                : lstm::ce_scale(weight, P);

    // ---- segment prologue: parameters into registers / shared memory -------------------
    float wf[4][KH], wx[4][kXPer], bias[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int64_t r = int64_t(g) * H + j;
#pragma unroll
      for (int m = 0; m < KH; ++m) {
        const int kk = slice_index(s, m);
        wf[g][m] = (jvalid && kk < H) ? __ldcg(a.w_hh + r * H + kk) : 0.f;
      }
#pragma unroll
      for (int m = 0; m < kXPer; ++m) {
        const int i = s + 16 * m;
        wx[g][m] = (jvalid && i < I) ? __ldcg(a.w_ih + r * I + i) : 0.f;
      }
      bias[g] = jvalid ? __ldcg(a.b_ih + r) + __ldcg(a.b_hh + r) : 0.f;
    }
    for (int e = tid; e < O * HP; e += kThreads) {
      const int o = e / HP, jj = e % HP;
      wo[o * HP + jj] = jj < H ? __ldcg(a.w_o + int64_t(o) * H + jj) : 0.f;
    }
    // x of the segment's first step into xbuf[t0 & 1]
    {
      float* xb = xbuf + (t0 & 1) * kPersistMaxInput * R;
      for (int e = tid; e < nb * kPersistMaxInput; e += kThreads) {
        const int b = e / kPersistMaxInput, i = e % kPersistMaxInput;
        xb[i * R + b] = i < I ? __ldg(a.x + (t0 * B + b0 + b) * I + i) : 0.f;
      }
    }
    // h_{-1}, c_{-1} of the segment, for the backward
    if (owner) {
      hs[int64_t(b0 + rb) * H + j] = h_reg;
      cs[int64_t(b0 + rb) * H + j] = c_reg;
    }
    float dwo[2] = {0.f, 0.f}, dbo = 0.f;  // head gradient partials (o = s + 16 m; tid)
    float dh_head = 0.f;                    // terminal loss: dL/dh_{T-1} of this lane's cell
    __syncthreads();

    // The head on h_t (hbuf row buffer hb) of the cluster's rows: outputs, loss rows,
    // d(weight * loss)/d pred into dpred; returns this lane's dL/dh_t[rb][j]; accumulates the
    // head's gradient partials. Every CTA of the cluster computes the same dpred (same
    // code, same order), so no exchange is needed; only rank 0 keeps the row losses and
    // the head bias gradient.
    auto head = [&](const float* hb, int64_t tt, int t_local) -> float {
      for (int e = tid; e < nb * O; e += kThreads) {
        const int b = e / O, o = e % O;
        const float* wrow = wo + o * HP;
        float z = 0.f;
        for (int kk = 0; kk < H; ++kk) z = fmaf(hb[kk * R + b], wrow[kk], z);
        dpred[b * kPersistMaxOutput + o] = z + __ldcg(a.b_o + o);
      }
      __syncthreads();
      if (tid < nb) {
        const int64_t row = a.per_step ? tt * B + b0 + tid : b0 + tid;  // target row
        float* z = dpred + tid * kPersistMaxOutput;
        const double r = a.loss == LSTM_LOSS_MSE
                             ? lstm::mse_row(z, a.target_f + row * O, O, scale)
                             : lstm::ce_row(z, a.target_i[row], O, scale);
        if (rank == 0) rowloss[(a.per_step ? int64_t(t_local) * B : 0) + b0 + tid] = r;
      }
      __syncthreads();
      float dh = 0.f;
      if (rb < nb && jvalid) {
        const float* d = dpred + rb * kPersistMaxOutput;
        for (int o = 0; o < O; ++o) dh = fmaf(d[o], wo[o * HP + j], dh);
      }
      if (jvalid) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int o = s + 16 * m;
          if (o < O)
            for (int b = 0; b < nb; ++b)
              dwo[m] = fmaf(dpred[b * kPersistMaxOutput + o], hb[j * R + b], dwo[m]);
        }
      }
      if (rank == 0 && tid < O)
        for (int b = 0; b < nb; ++b) dbo += dpred[b * kPersistMaxOutput + tid];
      __syncthreads();  // dpred is rewritten by the next head
      return dh;
    };

    // ---- forward ---------------------------------------------------------------------------
    for (int t = 0; t < Tp; ++t) {
      const int64_t tt = t0 + t;
      const float* hb = hbuf + (tt & 1) * HP * R;
      const float* xb = xbuf + (tt & 1) * kPersistMaxInput * R;
      if (a.per_step && t > 0) {  // the head of step t-1 (its h rows arrived at the last barrier)
        const float dh = head(hb, tt - 1, t - 1);
        if (owner) dhh[(int64_t(t - 1) * B + b0 + rb) * H + j] = dh;
      }
      // prefetch x_{t+1} into registers (stored after the product)
      float xn[2] = {0.f, 0.f};
      const bool more = t + 1 < Tp;
      if (more) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int e = tid + m * kThreads;
          const int b = e / kPersistMaxInput, i = e % kPersistMaxInput;
          if (b < nb && i < I) xn[m] = __ldg(a.x + ((tt + 1) * B + b0 + b) * I + i);
        }
      }
      float v[MAXB * 4];
#pragma unroll
      for (int e = 0; e < MAXB * 4; ++e) v[e] = 0.f;
      // h_{t-1}[b][k] for the thread's k, 4 batch rows per float4 (16 FMAs), then the
      // inputs likewise; quads by compile-time index (a run-time loop bound would stop the
      // unrolling and move v to local memory); rows >= nb are zero in shared memory.
      for (int rep = 0; rep < ((dbg & kDbgCompute2) ? 2 : 1); ++rep) {
#pragma unroll
      for (int m = 0; m < KH; ++m) {
        const float* row = hb + slice_index(s, m) * R;
        for_live_quads<MAXB>(nb, [&](auto qc) {
          constexpr int q4 = decltype(qc)::value;
          const float4 h4 = ld4(row + 4 * q4);
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            v[(4 * q4 + 0) * 4 + g] = fmaf(wf[g][m], h4.x, v[(4 * q4 + 0) * 4 + g]);
            v[(4 * q4 + 1) * 4 + g] = fmaf(wf[g][m], h4.y, v[(4 * q4 + 1) * 4 + g]);
            v[(4 * q4 + 2) * 4 + g] = fmaf(wf[g][m], h4.z, v[(4 * q4 + 2) * 4 + g]);
            v[(4 * q4 + 3) * 4 + g] = fmaf(wf[g][m], h4.w, v[(4 * q4 + 3) * 4 + g]);
          }
        });
      }
      }  // rep
#pragma unroll
      for (int m = 0; m < kXPer; ++m) {
        const float* row = xb + (s + 16 * m) * R;
        for_live_quads<MAXB>(nb, [&](auto qc) {
          constexpr int q4 = decltype(qc)::value;
          const float4 x4 = ld4(row + 4 * q4);
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            v[(4 * q4 + 0) * 4 + g] = fmaf(wx[g][m], x4.x, v[(4 * q4 + 0) * 4 + g]);
            v[(4 * q4 + 1) * 4 + g] = fmaf(wx[g][m], x4.y, v[(4 * q4 + 1) * 4 + g]);
            v[(4 * q4 + 2) * 4 + g] = fmaf(wx[g][m], x4.z, v[(4 * q4 + 2) * 4 + g]);
            v[(4 * q4 + 3) * 4 + g] = fmaf(wx[g][m], x4.w, v[(4 * q4 + 3) * 4 + g]);
          }
        });
      }
      slice_reduce<MAXB, 4>(v, s);
      float h_new = 0.f;
      if (rb < nb && jvalid && (dbg & kDbgNoCell)) {
        h_new = v[0] + v[1] + v[2] + v[3];
      } else if (rb < nb && jvalid) {
        const lstm::CellForward f = lstm::cell_forward(v[0] + bias[0], v[1] + bias[1],
                                                       v[2] + bias[2], v[3] + bias[3], c_reg);
        c_reg = f.c;
        h_reg = f.h;
        h_new = f.h;
        if (owner && !(dbg & kDbgNoGStore)) {
          const int64_t e = (int64_t(t) * B + b0 + rb) * H + j;
          gates[e] = make_float4(f.i, f.f, f.g, f.o);
          cs[BH + e] = f.c;
          hs[BH + e] = f.h;
        }
      }
      if (lane_writes<MAXB>(s) && rb < nb) {
        float* dst = hbuf + ((tt + 1) & 1) * HP * R + j * R + rb;  // j < HP always
        if (dbg & kDbgNoDsmem) {
          *dst = h_new;
        } else {
#pragma unroll
          for (int r = 0; r < CL; ++r) *cluster.map_shared_rank(dst, r) = h_new;
        }
      }
      if (more) {
        float* xn_b = xbuf + ((tt + 1) & 1) * kPersistMaxInput * R;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int e = tid + m * kThreads;
          if (e / kPersistMaxInput < nb) xn_b[(e % kPersistMaxInput) * R + e / kPersistMaxInput] = xn[m];
        }
      }
      csync();
    }
    mark(p, 1);
    {  // the head of the last step
      const int64_t tl = t0 + Tp;
      const float* hb = hbuf + (tl & 1) * HP * R;
      const float dh = head(hb, tl - 1, Tp - 1);
      if (a.per_step) {
        if (owner) dhh[(int64_t(Tp - 1) * B + b0 + rb) * H + j] = dh;
      } else {
        dh_head = dh;
      }
    }

    mark(p, 2);
    // ---- backward --------------------------------------------------------------------------
    // Thread (u, s) keeps W_hh[g*H + jj][j] for its unit j, the 4 gates g and its slice of the
    // units jj: the recurrent product dh_{t-1}[b][j] = sum_{g, jj} dG_t[b][g, jj] W_hh[g*H+jj][j]
    // (one float4 of dgbuf: 4 gates) and the W_hh gradient column dW[g*H+jj][j] +=
    // dG_t[b][g, jj] h_{t-1}[b][j]. Per step: wait -> recurrent product -> cell of step t-1 ->
    // broadcast -> arrive, then the weight gradients of step t while the cluster moves on
    // (the critical path carries the recurrent product only). The owner lane's cell data is
    // loaded one step ahead.
    float wt[4][KH], dwt[4][KH], dwx[4][kXPer], db[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int m = 0; m < KH; ++m) {
        const int jj = slice_index(s, m);
        wt[g][m] = (jvalid && jj < H) ? __ldcg(a.w_hh + (int64_t(g) * H + jj) * H + j) : 0.f;
        dwt[g][m] = 0.f;
      }
      db[g] = 0.f;
#pragma unroll
      for (int m = 0; m < kXPer; ++m) dwx[g][m] = 0.f;
    }
    const bool cell = rb < nb && jvalid;  // this lane runs the cell of (rb, j)
    auto cell_at = [&](int t) { return (int64_t(t) * B + b0 + rb) * H + j; };
    float4 gq = make_float4(0.f, 0.f, 0.f, 0.f);
    float c_cur = 0.f, c_prev = 0.f, h_prev = 0.f, dh_step = 0.f, dc_reg = 0.f, dh_rec = 0.f;
    float xr[2] = {0.f, 0.f};
    // loads of step t's cell data and x_t (c_cur = c_t is the previous step's c_prev)
    auto prefetch = [&](int t) {
      c_cur = c_prev;
      if (cell && !(dbg & kDbgNoPrefetch)) {
        const int64_t e = cell_at(t);
        gq = gates[e];
        c_prev = cs[e];
        h_prev = hs[e];
        if (a.per_step) dh_step = dhh[e];
      }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int e = tid + m * kThreads;
        const int b = e / kPersistMaxInput, i = e % kPersistMaxInput;
        xr[m] = (b < nb && i < I) ? __ldg(a.x + ((t0 + t) * B + b0 + b) * I + i) : 0.f;
      }
    };
    // the cell backward of step t with the prefetched data; dG_t to every CTA of the
    // cluster, h_{t-1} of the own unit and x_t to this CTA (buffers t % 3)
    auto cell_step = [&](int t) {
      float4 dg = make_float4(0.f, 0.f, 0.f, 0.f);
      if (cell) {
        const float dh = dh_rec + (a.per_step ? dh_step : (t == Tp - 1 ? dh_head : 0.f));
        const lstm::CellBackward d =
            lstm::cell_backward(gq.x, gq.y, gq.z, gq.w, c_cur, c_prev, dh, dc_reg);
        dc_reg = d.dc_prev;
        dg = make_float4(d.d_ai, d.d_af, d.d_ag, d.d_ao);
      }
      const int buf = t % 3;
      if (lane_writes<MAXB>(s) && rb < nb) {
        float* dst = dgbuf + buf * HP * RJ + j * RJ + rb * 4;
        if (dbg & kDbgNoDsmem) {
          *reinterpret_cast<float4*>(dst) = dg;
        } else {
#pragma unroll
          for (int r = 0; r < CL; ++r) *reinterpret_cast<float4*>(cluster.map_shared_rank(dst, r)) = dg;
        }
        hown[buf * kUnits * R + u * R + rb] = h_prev;
      }
      float* xn = xbuf + buf * kPersistMaxInput * R;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int e = tid + m * kThreads;
        if (e / kPersistMaxInput < nb) xn[(e % kPersistMaxInput) * R + e / kPersistMaxInput] = xr[m];
      }
    };
    c_prev = 0.f;
    if (cell) c_prev = cs[cell_at(Tp - 1) + BH];  // c_{Tp-1}: becomes c_cur in prefetch
    prefetch(Tp - 1);
    cell_step(Tp - 1);
    if (Tp > 1) prefetch(Tp - 2);
    cluster_arrive();
    for (int t = Tp - 1; t >= 0; --t) {
      cluster_wait();  // dG_t of every CTA is here
      // A CTA barrier as well: the cluster barrier already orders this step's writes to the
      // t % 3 buffers after every thread's reads of them two steps back, but
      // compute-sanitizer's racecheck does not follow split arrive/wait barriers (it
      // reported those pairs on the H200); this makes the order explicit for it.
      __syncthreads();
      const float* dgb = dgbuf + (t % 3) * HP * RJ;
      if (t > 0) {
        float v[MAXB];
#pragma unroll
        for (int b = 0; b < MAXB; ++b) v[b] = 0.f;
#pragma unroll
        for (int m = 0; m < KH; ++m) {
          const float* row = dgb + slice_index(s, m) * RJ;
          for_live_quads<MAXB>(nb, [&](auto qc) {
            constexpr int q4 = decltype(qc)::value;
#pragma unroll
            for (int bb = 0; bb < 4; ++bb) {
              const float4 d4 = ld4(row + (4 * q4 + bb) * 4);
              float& acc = v[4 * q4 + bb];
              acc = fmaf(d4.x, wt[0][m], acc);
              acc = fmaf(d4.y, wt[1][m], acc);
              acc = fmaf(d4.z, wt[2][m], acc);
              acc = fmaf(d4.w, wt[3][m], acc);
            }
          });
        }
        slice_reduce<MAXB, 1>(v, s);  // the recurrent gradient of step t - 1
        dh_rec = v[0];
        cell_step(t - 1);
        if (t > 1) prefetch(t - 2);
        cluster_arrive();
      }
      // the weight gradients of step t (buffers t % 3 stay untouched until this CTA's
      // arrival at the barrier of step t - 2)
      const float* ho = hown + (t % 3) * kUnits * R + u * R;
      const float* xp = xbuf + (t % 3) * kPersistMaxInput * R;
      float4 hq[Q];
#pragma unroll
      for (int q4 = 0; q4 < Q; ++q4) hq[q4] = ld4(ho + 4 * q4);
#pragma unroll
      for (int m = 0; m < KH; ++m) {
        const float* row = dgb + slice_index(s, m) * RJ;
        for_live_quads<MAXB>(nb, [&](auto qc) {
          constexpr int q4 = decltype(qc)::value;
          const float hb4[4] = {hq[q4].x, hq[q4].y, hq[q4].z, hq[q4].w};
#pragma unroll
          for (int bb = 0; bb < 4; ++bb) {
            const float4 d4 = ld4(row + (4 * q4 + bb) * 4);
            dwt[0][m] = fmaf(d4.x, hb4[bb], dwt[0][m]);
            dwt[1][m] = fmaf(d4.y, hb4[bb], dwt[1][m]);
            dwt[2][m] = fmaf(d4.z, hb4[bb], dwt[2][m]);
            dwt[3][m] = fmaf(d4.w, hb4[bb], dwt[3][m]);
          }
        });
      }
      {  // this unit's gate rows (g, j): input-weight and bias gradients
        const float* row = dgb + j * RJ;
        for_live_quads<MAXB>(nb, [&](auto qc) {
          constexpr int q4 = decltype(qc)::value;
#pragma unroll
          for (int bb = 0; bb < 4; ++bb) {
            const int b = 4 * q4 + bb;
            const float4 d4 = ld4(row + b * 4);
            const float dgv[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
            for (int m = 0; m < kXPer; ++m) {
              const float xv = xp[(s + 16 * m) * R + b];
#pragma unroll
              for (int g = 0; g < 4; ++g) dwx[g][m] = fmaf(dgv[g], xv, dwx[g][m]);
            }
#pragma unroll
            for (int g = 0; g < 4; ++g) db[g] += dgv[g];
          }
        });
      }
    }
    mark(p, 3);

    // ---- this cluster's partial gradients ------------------------------------------------
    if (jvalid) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int64_t r = int64_t(g) * H + j;
#pragma unroll
#pragma unroll
        for (int m = 0; m < kXPer; ++m) {
          const int i = s + 16 * m;
          if (i < I) part[PL.w_ih + r * I + i] = dwx[g][m];
        }
        if (s == 0) part[PL.b + r] = db[g];
      }
#pragma unroll
      for (int g = 0; g < 4; ++g)
#pragma unroll
        for (int m = 0; m < KH; ++m) {
          const int jj = slice_index(s, m);
          if (jj < H) part[PL.w_hh + (int64_t(g) * H + jj) * H + j] = dwt[g][m];
        }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int o = s + 16 * m;
        if (o < O) part[PL.w_o + int64_t(o) * H + j] = dwo[m];
      }
    }
    if (rank == 0 && tid < O) part[PL.b_o + tid] = dbo;
    grid.sync();
    mark(p, 4);

    // ---- gradients: the clusters' partials summed in cluster order; the loss --------------
    {
      const float* part0 = a.scratch + L.part;
      const int64_t stride = int64_t(gridDim.x) * kThreads;
      for (int64_t e = int64_t(blockIdx.x) * kThreads + tid; e < PL.n; e += stride) {
        // 16 loads in flight per batch (a plain loop would wait for each one in turn),
        // summed in cluster order; out-of-range clusters add +0
        float acc = 0.f;
        for (int c0 = 0; c0 < k.n_clusters; c0 += 16) {
          float pv[16];
#pragma unroll
          for (int i = 0; i < 16; ++i)
            pv[i] = c0 + i < k.n_clusters ? __ldcg(part0 + int64_t(c0 + i) * PL.n + e) : 0.f;
#pragma unroll
          for (int i = 0; i < 16; ++i) acc += pv[i];
        }
        if (e < PL.w_hh) a.g_w_ih[e - PL.w_ih] = acc;
        else if (e < PL.b) a.g_w_hh[e - PL.w_hh] = acc;
        else if (e < PL.w_o) {
          a.g_b_ih[e - PL.b] = acc;
          a.g_b_hh[e - PL.b] = acc;
        } else if (e < PL.b_o) a.g_w_o[e - PL.w_o] = acc;
        else a.g_b_o[e - PL.b_o] = acc;
      }
      if (blockIdx.x == 0) {
        double acc = 0.0;
        for (int64_t r = tid; r < P; r += kThreads) acc += __ldcg(rowloss + r);
        const double tot = block_sum(acc, ush.warp);
        if (tid == 0)
          a.loss_out[p] = float(a.loss == LSTM_LOSS_MSE ? tot / double(P * O) : tot / double(P));
      }
    }
    grid.sync();
    mark(p, 5);

    // ---- the fused FPTT update (clip + steps 2-6), then the next segment's weights ---------
    switch (k.optimizer) {  // uniform: one variant per launch
      case OPT_SGD: fused_update_phases<OPT_SGD>(table, clip, status, ush); break;
      case OPT_ADAM: fused_update_phases<OPT_ADAM>(table, clip, status, ush); break;
      default: fused_update_phases<OPT_ADAMW>(table, clip, status, ush); break;
    }
    grid.sync();
    mark(p, 6);
  }
  if (stamp) {
    unsigned long long gt;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt));
    k.prof[kProfSegs * kProfPer + 2] = (long long)gt;
    k.prof[kProfSegs * kProfPer + 3] = clock64();
  }

  if (rb < nb && jvalid && lane_writes<MAXB>(s)) {
    a.h_out[int64_t(b0 + rb) * H + j] = h_reg;
    a.c_out[int64_t(b0 + rb) * H + j] = c_reg;
  }
#endif
}

// ---- host side ------------------------------------------------------------------------------

template <int MAXB>
const void* pkernel_for(int cl) {
#ifdef FPTT_PERSIST_ONLY_CL  // tuning builds of one variant: -DFPTT_PERSIST_ONLY_CL=8 -DFPTT_PERSIST_ONLY_MAXB=16
  if constexpr (MAXB == FPTT_PERSIST_ONLY_MAXB)
    return cl == FPTT_PERSIST_ONLY_CL
               ? reinterpret_cast<const void*>(&lstm_persistent_kernel<FPTT_PERSIST_ONLY_CL, MAXB>)
               : nullptr;
  return nullptr;
#else
  switch (cl) {
    case 1: return reinterpret_cast<const void*>(&lstm_persistent_kernel<1, MAXB>);
    case 2: return reinterpret_cast<const void*>(&lstm_persistent_kernel<2, MAXB>);
    case 4: return reinterpret_cast<const void*>(&lstm_persistent_kernel<4, MAXB>);
    case 8: return reinterpret_cast<const void*>(&lstm_persistent_kernel<8, MAXB>);
    default: return nullptr;
  }
#endif
}

const void* kernel_for(int cl, int maxb) {
  return maxb == 8 ? pkernel_for<8>(cl) : pkernel_for<16>(cl);
}

size_t smem_bytes(int cl, int maxb) {
  switch (cl * 100 + maxb) {
    case 108: return Smem<1, 8>::bytes;
    case 116: return Smem<1, 16>::bytes;
    case 208: return Smem<2, 8>::bytes;
    case 216: return Smem<2, 16>::bytes;
    case 408: return Smem<4, 8>::bytes;
    case 416: return Smem<4, 16>::bytes;
    case 808: return Smem<8, 8>::bytes;
    default: return Smem<8, 16>::bytes;
  }
}

int cluster_size_for(int64_t H) {
  int cl = 1;
  while (16 * cl < H) cl *= 2;
  return cl;
}

// Clusters of one (cl, maxb, optimizer) kernel that can be resident at once on `device`,
// cached (the queries put no work on a stream). Negative: a cudaError_t code.
struct ClusterCap {
  std::mutex mutex;
  int cap[64][4][2] = {};  // device, log2 cl, maxb 8/16

  int get(int device, int cl, int maxb) {
    if (device < 0 || device >= 64) return -int(cudaErrorInvalidDevice);
    const void* fn = kernel_for(cl, maxb);
    if (fn == nullptr) return -int(cudaErrorInvalidValue);
    int lc = cl == 1 ? 0 : cl == 2 ? 1 : cl == 4 ? 2 : 3;
    std::lock_guard<std::mutex> lock(mutex);
    int& c = cap[device][lc][maxb == 16];
    if (c != 0) return c;
    int major = 0;
    cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (e != cudaSuccess) return -int(e);
    if (major < 9) return c = -int(cudaErrorNotSupported);  // clusters: sm_90 and newer
    int coop = 0;
    e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
    if (e != cudaSuccess) return -int(e);
    if (!coop) return c = -int(cudaErrorNotSupported);
    const size_t bytes = smem_bytes(cl, maxb);
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (e != cudaSuccess) return -int(e);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(cl));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = bytes;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(cl);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    e = cudaOccupancyMaxActiveClusters(&n, fn, &cfg);
    if (e != cudaSuccess) return -int(e);
    if (n < 1) return c = -int(cudaErrorLaunchOutOfResources);
    return c = n;
  }
};
ClusterCap g_ccap;

}  // namespace

PersistentPlan lstm_persistent_plan(int64_t B, int64_t I, int64_t H, int64_t O, int optimizer,
                                    int device) {
  PersistentPlan plan = {};
  if (B < 1 || I < 1 || H < 1 || O < 1 || H > kPersistMaxHidden || I > kPersistMaxInput ||
      O > kPersistMaxOutput || optimizer < OPT_SGD || optimizer > OPT_ADAMW) {
    plan.error = int(cudaErrorInvalidValue);
    return plan;
  }
  const int cl = cluster_size_for(H);
  for (int maxb : {8, 16}) {
    const int cap = g_ccap.get(device, cl, maxb);
    if (cap < 0) {
      plan.error = -cap;
      return plan;
    }
    const int64_t want = B < cap ? B : cap;          // clusters to use
    const int64_t bpc = (B + want - 1) / want;       // rows per cluster
    if (bpc > maxb) continue;
    plan.ok = 1;
    plan.cluster = cl;
    plan.max_rows = maxb;
    plan.rows_per_cluster = int(bpc);
    plan.clusters = int((B + bpc - 1) / bpc);
    plan.error = 0;
    return plan;
  }
  plan.error = int(cudaErrorInvalidValue);  // more rows than the resident clusters hold
  return plan;
}

int64_t lstm_persistent_scratch_floats(const PersistentPlan& plan, int64_t omega, int64_t B,
                                       int64_t I, int64_t H, int64_t O, int per_step) {
  return pscratch_layout(omega, B, I, H, O, per_step, plan.clusters).total;
}

int launch_lstm_persistent(const LstmSegmentArgs& args, int64_t n_segs, int weight_ramp,
                           const PersistentPlan& plan, const UpdateTable& table, int optimizer,
                           float clip, float* status, int device, void* stream) {
  const LstmSegmentArgs& a = args;
  if (!plan.ok || n_segs < 1 || a.T < n_segs || a.B < 1 || a.I < 1 || a.H < 1 || a.O < 1 ||
      a.H > kPersistMaxHidden || a.I > kPersistMaxInput || a.O > kPersistMaxOutput ||
      (a.loss != LSTM_LOSS_MSE && a.loss != LSTM_LOSS_CE) ||
      (a.loss == LSTM_LOSS_MSE ? a.target_f == nullptr : a.target_i == nullptr) ||
      !a.x || !a.h0 || !a.c0 || !a.w_ih || !a.w_hh || !a.b_ih || !a.b_hh || !a.w_o || !a.b_o ||
      !a.g_w_ih || !a.g_w_hh || !a.g_b_ih || !a.g_b_hh || !a.g_w_o || !a.g_b_o || !a.h_out ||
      !a.c_out || !a.loss_out || !a.scratch || (reinterpret_cast<uintptr_t>(a.scratch) & 15u) ||
      plan.rows_per_cluster * int64_t(plan.clusters) < a.B)
    return int(cudaErrorInvalidValue);
  if (table.n_slots < 1 || table.n_chunks < table.n_slots || table.slots == nullptr ||
      table.scalars == nullptr || table.partials == nullptr || status == nullptr)
    return int(cudaErrorInvalidValue);
  const void* fn = kernel_for(plan.cluster, plan.max_rows);
  if (fn == nullptr) return int(cudaErrorInvalidValue);
  PKArgs k;
  k.a = a;
  k.n_segs = n_segs;
  k.omega = (a.T + n_segs - 1) / n_segs;
  k.weight_ramp = weight_ramp;
  k.bpc = plan.rows_per_cluster;
  k.n_clusters = plan.clusters;
  k.optimizer = optimizer;
  k.prof = g_prof;
  k.debug = g_debug;
  if ((a.T + k.omega - 1) / k.omega != n_segs) return int(cudaErrorInvalidValue);
  UpdateTable t = table;
  float c = clip;
  float* st = status;
  void* kargs[] = {&k, &t, &c, &st};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(plan.clusters * plan.cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem_bytes(plan.cluster, plan.max_rows);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(plan.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeCooperative;
  attr[1].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 2;
  (void)device;
  return int(cudaLaunchKernelExC(&cfg, fn, kargs));
}

#ifdef FPTT_PERSISTENT_TUNING
int lstm_persistent_profile_slots() { return kProfSegs * kProfPer + 4; }
void lstm_persistent_set_profile(long long* stamps) { g_prof = stamps; }
void lstm_persistent_set_debug(int bits) { g_debug = bits; }
#endif

}  // namespace cuda
}  // namespace fptt
