// FPTT fused update on CUDA: one cooperative kernel launch per optimiser step for all
// tensors (FPTT.md steps 2-6). No torch headers: this file builds with plain
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/fused_update.cu
// The pointwise math is fptt_math.h's, shared with the CPU kernels.
//
// Design (see also cuda_kernels.h):
//
// * Work unit: chunks of kChunk elements, numbered globally over the slots (a slot owns
//   chunks [chunk_begin, chunk_begin + chunks_of(n))). Block b takes chunks b, b+G,
//   b+2G, ... (G = gridDim.x) in both phases.
//
// * Phase 1 writes one double partial sum of squares per chunk. Within a chunk, thread t
//   handles the 4-element groups t, t+kThreads, ... and accumulates their elements in
//   order; the block then reduces with a fixed shuffle tree. The vectorised (float4) and
//   scalar paths visit elements in the same order, so a partial depends only on the
//   chunk's data: not on the grid size, the GPU, or the tensors' alignment.
//
// * Grid-wide sync: cooperative launch + cooperative_groups::this_grid().sync(). The grid
//   is capped at cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs (the co-residency
//   cudaLaunchCooperativeKernel requires) and at the number of chunks. With CUDA >= 11.0
//   grid_group::sync() does NOT need relocatable device code (-rdc=true) nor cudadevrt:
//   the barrier lives in a driver-provided grid workspace (cooperative_groups/details/
//   driver_abi.h reads its address from %envreg), and the sync is a release/acquire
//   atomic at gpu scope. This file compiles and links in whole-program mode (no -rdc),
//   which setup.py's CUDAExtension uses. Cooperative launches can be stream-captured
//   into CUDA graphs (the kernel node carries cudaLaunchAttributeCooperative).
//   A last-block ("threadfence reduction") scheme was not chosen: it would need either
//   a second kernel for the update, or the update to wait for the norm anyway, i.e. a
//   grid-wide barrier built by hand; and it needs a zeroed arrival counter in memory.
//
// * Phase 2: every block reduces all partials in the same fixed order (thread t sums
//   partials t, t+kThreads, ... then the same shuffle tree), so every block holds the
//   bitwise-same norm without a second barrier. The cost is n_chunks doubles read from
//   L2 per block (n_params/512 bytes per block), small next to the update's traffic.
//
// * Step-count race: phase 2 needs each slot's step count *before* the update, while the
//   count must be advanced exactly once. In phase 1 the block owning a slot's first chunk
//   reads step[i] and saves {step_before, Adam bias corrections, SGD first-step flag} in
//   the scratch scalars[i]. After grid.sync() every block reads scalars[i] only; nobody
//   reads step[i] in phase 2, so the owner block may write step[i] = step_before + 1
//   there without a second grid.sync (and only when the norm is finite).
//
// * Non-finite norm: every block sees the same norm, so all of them return before
//   writing anything; block 0 writes the status. status is touched by thread 0 of
//   block 0 only.
//
// * No host synchronisation, allocation or memcpy in the launch path (graph capturable).
//   The occupancy / SM-count queries are cached per device after the first call. If the
//   cooperative launch is still too large (MPS or partitioned SMs), the grid is halved
//   until it fits; the results do not depend on the grid size.
//
// * Occupancy: __launch_bounds__(kThreads, kMinBlocksPerSM = 4) caps registers at 64
//   (ptxas, CUDA 13.0, sm_90: 64 registers, up to ~140 bytes of spill loads in the Adam
//   variants, which stay in L1). Not tuned on hardware yet: kMinBlocksPerSM = 3 gives 80
//   registers and fewer spills, 2 gives no spills but half the threads per SM.
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <mutex>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/fptt_math.h"

namespace cg = cooperative_groups;

namespace fptt {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
// At least 4 co-resident blocks (1024 threads) per SM: caps registers at 64 per thread,
// enough memory parallelism for this bandwidth-bound kernel.
constexpr int kMinBlocksPerSM = 4;
constexpr int kGroupsPerThread = int(kChunk / 4 / kThreads);  // 4-element groups per thread
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of 32");
static_assert(kChunk % (4 * kThreads) == 0, "a chunk must be whole 4-groups for every thread");

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Sum of v over the block with a fixed tree (shuffles within each warp, then warp 0
// over the warp sums). The result is valid in thread 0. Ends with __syncthreads(), so
// shm can be reused right away.
__device__ __forceinline__ double block_sum(double v, double* shm) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    r = lane < kWarps ? shm[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) r += __shfl_down_sync(0xffffffffu, r, off);
  }
  __syncthreads();
  return r;
}

// The slot owning global chunk k: the last slot with chunk_begin <= k (binary search;
// chunk_begin is ascending and slots[0].chunk_begin == 0). All threads of a block
// search the same k, so the loads are broadcasts.
__device__ __forceinline__ int find_slot(const UpdateSlot* __restrict__ slots, int n_slots,
                                         int64_t k) {
  int lo = 0, hi = n_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (slots[mid].chunk_begin <= k) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Phase 1 on one chunk: this thread's part of the sum of squares of the regularised
// gradient (FPTT.md step 2), elements in a fixed order whatever the path.
__device__ __forceinline__ double chunk_sumsq(const UpdateSlot& s, int64_t base, int len) {
  const float* __restrict__ w = s.w + base;
  const float* __restrict__ g = s.g + base;
  const float* __restrict__ wb = s.w_bar + base;
  const float* __restrict__ lam = s.lam + base;
  const float* h = s.hyper;
  const bool vec = aligned16(w) && aligned16(g) && aligned16(wb) && aligned16(lam);
  double acc = 0.0;
#pragma unroll
  for (int j = 0; j < kGroupsPerThread; ++j) {
    const int e = 4 * (int(threadIdx.x) + j * kThreads);
    if (e >= len) break;
    if (vec && e + 4 <= len) {
      const float4 w4 = *reinterpret_cast<const float4*>(w + e);
      const float4 g4 = *reinterpret_cast<const float4*>(g + e);
      const float4 b4 = *reinterpret_cast<const float4*>(wb + e);
      const float4 l4 = *reinterpret_cast<const float4*>(lam + e);
      const float r0 = regularised_grad(g4.x, w4.x, b4.x, l4.x, h);
      const float r1 = regularised_grad(g4.y, w4.y, b4.y, l4.y, h);
      const float r2 = regularised_grad(g4.z, w4.z, b4.z, l4.z, h);
      const float r3 = regularised_grad(g4.w, w4.w, b4.w, l4.w, h);
      acc += double(r0) * double(r0);
      acc += double(r1) * double(r1);
      acc += double(r2) * double(r2);
      acc += double(r3) * double(r3);
    } else {
      for (int c = 0; c < 4 && e + c < len; ++c) {
        const float r = regularised_grad(g[e + c], w[e + c], wb[e + c], lam[e + c], h);
        acc += double(r) * double(r);
      }
    }
  }
  return acc;
}

// Phase 2 on one chunk: steps 2-6 on this thread's elements.
template <int OPT>
__device__ __forceinline__ void chunk_update(const UpdateSlot& s, int64_t base, int len,
                                             const StepScalars& sc) {
  float* __restrict__ w = s.w + base;
  const float* __restrict__ g = s.g + base;
  float* __restrict__ wb = s.w_bar + base;
  float* __restrict__ lam = s.lam + base;
  float* __restrict__ s1 = s.s1 + base;
  float* __restrict__ s2 = OPT == OPT_SGD ? nullptr : s.s2 + base;  // SGD: never touched
  const float* h = s.hyper;
  const bool vec = aligned16(w) && aligned16(g) && aligned16(wb) && aligned16(lam) &&
                   aligned16(s1) && (OPT == OPT_SGD || aligned16(s2));
#pragma unroll
  for (int j = 0; j < kGroupsPerThread; ++j) {
    const int e = 4 * (int(threadIdx.x) + j * kThreads);
    if (e >= len) break;
    if (vec && e + 4 <= len) {
      float4 w4 = *reinterpret_cast<const float4*>(w + e);
      const float4 g4 = *reinterpret_cast<const float4*>(g + e);
      float4 b4 = *reinterpret_cast<const float4*>(wb + e);
      float4 l4 = *reinterpret_cast<const float4*>(lam + e);
      float4 m4 = *reinterpret_cast<const float4*>(s1 + e);
      float4 v4 = make_float4(0.f, 0.f, 0.f, 0.f);
      if (OPT != OPT_SGD) v4 = *reinterpret_cast<const float4*>(s2 + e);
      update_element<OPT>(w4.x, g4.x, b4.x, l4.x, m4.x, v4.x, h, sc);
      update_element<OPT>(w4.y, g4.y, b4.y, l4.y, m4.y, v4.y, h, sc);
      update_element<OPT>(w4.z, g4.z, b4.z, l4.z, m4.z, v4.z, h, sc);
      update_element<OPT>(w4.w, g4.w, b4.w, l4.w, m4.w, v4.w, h, sc);
      *reinterpret_cast<float4*>(w + e) = w4;
      *reinterpret_cast<float4*>(wb + e) = b4;
      *reinterpret_cast<float4*>(lam + e) = l4;
      *reinterpret_cast<float4*>(s1 + e) = m4;
      if (OPT != OPT_SGD) *reinterpret_cast<float4*>(s2 + e) = v4;
    } else {
      for (int c = 0; c < 4 && e + c < len; ++c) {
        const int i = e + c;
        float wi = w[i], bi = wb[i], li = lam[i], mi = s1[i];
        float vi = OPT == OPT_SGD ? 0.f : s2[i];
        update_element<OPT>(wi, g[i], bi, li, mi, vi, h, sc);
        w[i] = wi;
        wb[i] = bi;
        lam[i] = li;
        s1[i] = mi;
        if (OPT != OPT_SGD) s2[i] = vi;
      }
    }
  }
}

// Phase 1, by the owner of a slot's first chunk: the step scalars of fptt_math.h from
// the step count before the update. Kept out of line: the double pow() of the Adam bias
// corrections would otherwise raise the register count of the whole kernel.
__device__ __noinline__ void save_scalars(const float* step, const float* hyper,
                                         SlotScalars* out) {
  const float before = *step;
  const StepScalars q = step_scalars(hyper, before, 1.f);
  *out = SlotScalars{before, q.step_size, q.bc2_sqrt, q.first ? 1.f : 0.f};
}

template <int OPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
fused_update_kernel(UpdateTable t, float clip, float* __restrict__ status) {
  __shared__ double shm[kWarps];
  __shared__ double sh_norm;
  cg::grid_group grid = cg::this_grid();
  const UpdateSlot* __restrict__ slots = t.slots;

  // ---- phase 1: per-chunk partial sums of squares; owners save step scalars ----------
  for (int64_t k = blockIdx.x; k < t.n_chunks; k += gridDim.x) {
    const int si = find_slot(slots, t.n_slots, k);
    const UpdateSlot s = slots[si];
    const int64_t base = (k - s.chunk_begin) * kChunk;
    const int64_t rest = s.n - base;
    const int len = int(rest < kChunk ? (rest > 0 ? rest : 0) : kChunk);
    const double part = block_sum(chunk_sumsq(s, base, len), shm);
    if (threadIdx.x == 0) {
      t.partials[k] = part;
      if (k == s.chunk_begin) save_scalars(s.step, s.hyper, t.scalars + si);  // block owns slot si's step
    }
  }

  grid.sync();  // partials and scalars are visible to every block from here on

  // ---- phase 2: the same norm in every block, then the update -------------------------
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < t.n_chunks; k += kThreads) acc += __ldcg(t.partials + k);
  const double sumsq = block_sum(acc, shm);
  if (threadIdx.x == 0) sh_norm = sqrt(sumsq);
  __syncthreads();
  const double norm = sh_norm;
  const bool first_thread = blockIdx.x == 0 && threadIdx.x == 0;
  if (!isfinite(norm)) {  // the same decision in every block: nothing is written
    if (first_thread) {
      status[0] = float(norm);
      status[1] = 1.f;
      status[2] += 1.f;
    }
    return;
  }
  if (first_thread) {
    status[0] = float(norm);
    status[1] = 0.f;
  }
  const float coef = clip_coefficient(norm, clip);
  for (int64_t k = blockIdx.x; k < t.n_chunks; k += gridDim.x) {
    const int si = find_slot(slots, t.n_slots, k);
    const UpdateSlot s = slots[si];
    const int64_t base = (k - s.chunk_begin) * kChunk;
    const int64_t rest = s.n - base;
    const int len = int(rest < kChunk ? (rest > 0 ? rest : 0) : kChunk);
    const float4 q = __ldcg(reinterpret_cast<const float4*>(t.scalars + si));
    StepScalars sc;
    sc.coef = coef;
    sc.step_size = q.y;
    sc.bc2_sqrt = q.z;
    sc.first = q.w != 0.f;
    chunk_update<OPT>(s, base, len, sc);
    // Only the owner writes the count; no block reads step[] in phase 2 (see the top).
    if (threadIdx.x == 0 && k == s.chunk_begin) *s.step = q.x + 1.f;
  }
}

static_assert(sizeof(SlotScalars) == sizeof(float4), "SlotScalars is read as one float4");

template <int OPT>
const void* kernel_ptr() {
  return reinterpret_cast<const void*>(&fused_update_kernel<OPT>);
}

const void* kernel_for(int optimizer) {
  switch (optimizer) {
    case OPT_SGD: return kernel_ptr<OPT_SGD>();
    case OPT_ADAM: return kernel_ptr<OPT_ADAM>();
    case OPT_ADAMW: return kernel_ptr<OPT_ADAMW>();
    default: return nullptr;
  }
}

// Max co-resident blocks per device and optimizer, queried once (a host-side query,
// no stream work; later calls, e.g. while capturing a graph, use the cached value).
constexpr int kMaxDevices = 64;
std::mutex g_cap_mutex;
int64_t g_cap[kMaxDevices][3] = {};

int64_t max_coresident_blocks(int optimizer, int device) {
  if (device < 0 || device >= kMaxDevices) return -int64_t(cudaErrorInvalidDevice);
  std::lock_guard<std::mutex> lock(g_cap_mutex);
  int64_t& cap = g_cap[device][optimizer];
  if (cap > 0) return cap;
  int coop = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (e != cudaSuccess) return -int64_t(e);
  if (!coop) return -int64_t(cudaErrorNotSupported);
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return -int64_t(e);
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_for(optimizer), kThreads, 0);
  if (e != cudaSuccess) return -int64_t(e);
  if (per_sm < 1 || sms < 1) return -int64_t(cudaErrorLaunchOutOfResources);
  cap = int64_t(per_sm) * int64_t(sms);
  return cap;
}

}  // namespace

int64_t fused_update_grid_size(int64_t n_chunks, int optimizer, int device) {
  if (optimizer < OPT_SGD || optimizer > OPT_ADAMW || n_chunks < 1)
    return -int64_t(cudaErrorInvalidValue);
  const int64_t cap = max_coresident_blocks(optimizer, device);
  if (cap < 0) return cap;
  return n_chunks < cap ? n_chunks : cap;
}

int launch_fused_update(const UpdateTable& table, int optimizer, float clip, float* status,
                        int device, void* stream) {
  if (table.n_slots < 1 || table.n_chunks < table.n_slots || table.slots == nullptr ||
      table.scalars == nullptr || table.partials == nullptr || status == nullptr)
    return int(cudaErrorInvalidValue);
  int64_t grid = fused_update_grid_size(table.n_chunks, optimizer, device);
  if (grid < 0) return int(-grid);
  UpdateTable t = table;
  float c = clip;
  float* st = status;
  void* args[] = {&t, &c, &st};
  for (;;) {
    const cudaError_t e = cudaLaunchCooperativeKernel(kernel_for(optimizer), dim3(unsigned(grid)),
                                                      dim3(kThreads), args, 0,
                                                      static_cast<cudaStream_t>(stream));
    if (e != cudaErrorCooperativeLaunchTooLarge || grid == 1) return int(e);
    // Fewer SMs usable than the device has (MPS, a partitioned context): clear the
    // (non-sticky) error, halve the grid and remember the smaller cap. The results do
    // not depend on the grid size (fixed chunks), so this changes no bit of them.
    (void)cudaGetLastError();
    grid = (grid + 1) / 2;
    std::lock_guard<std::mutex> lock(g_cap_mutex);
    g_cap[device][optimizer] = grid;
  }
}

const char* launch_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace cuda
}  // namespace fptt
