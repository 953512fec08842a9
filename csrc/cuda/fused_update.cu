// FPTT fused update on CUDA: one cooperative kernel launch per optimiser step for all
// tensors (docs/ALGORITHM.md, steps 2-6), launched by csrc/cuda_glue/update_cuda.cpp
// through cuda_kernels.h's launch_fused_update. No torch headers: builds with plain
//   nvcc -c -arch=sm_90 -I csrc/include csrc/cuda/fused_update.cu
// Pointwise math: fptt_math.h (shared with the CPU kernels); the two phases' device code:
// fused_update_device.cuh (shared with the LSTM kernels). Contracts: the norm is bitwise
// independent of the grid size; no host sync, allocation or memcpy when launching.
// Design: docs/KERNELS.md#csrccudafused_updatecu
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
