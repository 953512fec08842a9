// FPTT fused update on CUDA: one cooperative kernel launch per optimiser step for all
// tensors (docs/ALGORITHM.md, steps 2-6). No torch headers: this file builds with plain
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/fused_update.cu
// The pointwise math is fptt_math.h's, shared with the CPU kernels; the device code of
// the two phases is fused_update_device.cuh's, shared with csrc/cuda/lstm_segment.cu.
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
#include "coresident.cuh"
#include "fptt_fast/fptt_math.h"
#include "fused_update_device.cuh"

namespace fptt {
namespace cuda {
namespace {

// At least 4 co-resident blocks (1024 threads) per SM: caps registers at 64 per thread,
// enough memory parallelism for this bandwidth-bound kernel.
constexpr int kMinBlocksPerSM = 4;

template <int OPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
fused_update_kernel(UpdateTable t, float clip, float* __restrict__ status) {
  __shared__ UpdateShared sh;
  fused_update_phases<OPT>(t, clip, status, sh);
}

struct Kernels {  // coresident.cuh's kernel_for_optimizer
  template <int OPT>
  static const void* ptr() { return reinterpret_cast<const void*>(&fused_update_kernel<OPT>); }
};

const void* kernel_for(int optimizer) { return kernel_for_optimizer<Kernels>(optimizer); }

CoresidentCap g_cap;  // co-resident blocks per device and optimizer (coresident.cuh)

}  // namespace

int64_t fused_update_grid_size(int64_t n_chunks, int optimizer, int device) {
  if (optimizer < OPT_SGD || optimizer > OPT_ADAMW || n_chunks < 1)
    return -int64_t(cudaErrorInvalidValue);
  const int64_t cap = g_cap.get(kernel_for(optimizer), optimizer, device, kThreads);
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
  return g_cap.launch(kernel_for(optimizer), optimizer, device, grid, kThreads, args,
                      static_cast<cudaStream_t>(stream));
}

const char* launch_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace cuda
}  // namespace fptt
