// Device code of the fused FPTT update (docs/ALGORITHM.md, steps 2-6), shared by the kernels that
// run it: csrc/cuda/fused_update.cu (the update alone) and csrc/cuda/lstm_segment.cu (the
// LSTM segment step, whose last phases are this update). No torch headers. The design
// (chunks, fixed-order norm, step-count race) is described at the top of fused_update.cu.
//
// Requirements on the caller: blockDim.x == kThreads; a cooperative launch (the update
// calls grid.sync() once); every block of the grid calls fused_update_phases (each with
// the same arguments), after which the update's arrays must not be touched by the kernel.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/fptt_math.h"

namespace fptt {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
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
// gradient (docs/ALGORITHM.md, step 2), elements in a fixed order whatever the path.
// Loads go through L2 (__ldcg), never the non-coherent read-only path: a kernel that runs
// several updates (lstm_persistent.cu: one per segment) rewrites g (from other blocks)
// and w, w_bar, lam between them, and a line cached by an earlier read could be stale.
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
      const float4 w4 = __ldcg(reinterpret_cast<const float4*>(w + e));
      const float4 g4 = __ldcg(reinterpret_cast<const float4*>(g + e));
      const float4 b4 = __ldcg(reinterpret_cast<const float4*>(wb + e));
      const float4 l4 = __ldcg(reinterpret_cast<const float4*>(lam + e));
      const float r0 = norm_input(g4.x, w4.x, b4.x, l4.x, h);
      const float r1 = norm_input(g4.y, w4.y, b4.y, l4.y, h);
      const float r2 = norm_input(g4.z, w4.z, b4.z, l4.z, h);
      const float r3 = norm_input(g4.w, w4.w, b4.w, l4.w, h);
      acc += double(r0) * double(r0);
      acc += double(r1) * double(r1);
      acc += double(r2) * double(r2);
      acc += double(r3) * double(r3);
    } else {
      for (int c = 0; c < 4 && e + c < len; ++c) {
        const float r = norm_input(__ldcg(g + e + c), __ldcg(w + e + c),
                                         __ldcg(wb + e + c), __ldcg(lam + e + c), h);
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
      const float4 g4 = __ldcg(reinterpret_cast<const float4*>(g + e));
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
        update_element<OPT>(wi, __ldcg(g + i), bi, li, mi, vi, h, sc);
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

// Shared memory the update phases need, declared by the calling kernel.
struct UpdateShared {
  double warp[kWarps];  // block_sum's per-warp partials
  double norm;          // the global norm, broadcast in the block
};

// Phase 1 (per-chunk partial sums of squares; owners save the step scalars), grid.sync(),
// phase 2 (the same norm in every block, clip, update, step counts). Returns after
// phase 2 in every block; with a non-finite norm nothing but the status is written.
template <int OPT>
__device__ __forceinline__ void fused_update_phases(const UpdateTable& t, float clip,
                                                    float* __restrict__ status, UpdateShared& sh) {
  double* shm = sh.warp;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
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
  if (threadIdx.x == 0) sh.norm = sqrt(sumsq);
  __syncthreads();
  const double norm = sh.norm;
  const bool first_thread = blockIdx.x == 0 && threadIdx.x == 0;
  // Finite as the float32 the reference computes (a double norm beyond FLT_MAX is not);
  // the same decision in every block: nothing is written.
  if (!isfinite(float(norm))) {
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

}  // namespace
}  // namespace cuda
}  // namespace fptt
