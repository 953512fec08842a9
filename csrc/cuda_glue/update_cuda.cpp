// Torch glue of the fused FPTT update on CUDA: checks (update_checks.h), the device-side
// slot table (cached), and the launch of csrc/cuda/fused_update.cu on torch's current stream.
// Built only with FPTT_WITH_CUDA (setup.py's CUDAExtension); registry.h calls
// register_update_cuda(m). Contracts: a steady-state step only compares the cache key and
// launches (no host-to-device copy); a cache miss while capturing a CUDA graph raises (run
// a step eagerly first); one optimiser's steps must not run concurrently on two streams.
// Design: docs/KERNELS.md#csrccuda_glueupdate_cudacpp
#include <torch/extension.h>

// c10/cuda headers only (at::cuda::getCurrentCUDAStream is c10::cuda's, reached through
// namespace at's using-directive): ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE
// headers, which a CUDA toolkit without those libraries lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/seam_cast.h"
#include "fptt_fast/update_checks.h"
#include "glue_common.h"

namespace fptt {
namespace {

struct TableEntry {
  std::vector<int64_t> key;
  at::Tensor table_ws;                  // device uint8 [WorkspaceLayout::total_bytes]
  cuda::UpdateTable table;              // device pointers into table_ws
  std::vector<c10::StreamId> table_streams;  // the one it was allocated on, then recorded ones
  bool keep = false;                    // referenced by a captured CUDA graph
  uint64_t last_use = 0;
};

constexpr size_t kMaxEntries = 8;
std::mutex g_mutex;
std::list<TableEntry> g_cache;  // glue_common.h: a list, entries never move
uint64_t g_clock = 0;

void fused_update_cuda(const FpttState& state) {
  // Every check before any data pointer is taken (update_checks.h: the same code as
  // fused_update_cpu's, run on CPU CI by tests/csrc/check_bindings.cpp): lengths, devices
  // (one CUDA device for all, status and hyper included), dtypes, contiguity, sizes, codes,
  // group indices, and no output overlapping another argument.
  const c10::Device device =
      checks::check_fused_update_args("fused_update_cuda", state, /*with_status=*/true,
                                      at::kCUDA);
  if (state.size() == 0) return;

  c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(device.index());
  glue::SlotTable t = glue::make_slot_table(state, device.index());

  const bool capturing = glue::stream_is_capturing(stream.stream());
  std::lock_guard<std::mutex> lock(g_mutex);
  TableEntry* entry = glue::find_entry(g_cache, t.key);
  if (entry == nullptr) {
    FPTT_CHECK(!capturing,
                "fused_update_cuda: the parameters, gradients, state or hyper-parameter table "
                "changed while capturing a CUDA graph; run one step eagerly (warm-up) with the "
                "same tensors before capturing");
    entry = &glue::insert_entry(g_cache, kMaxEntries, std::move(t), device, stream);
  }
  entry->last_use = ++g_clock;
  if (capturing)
    entry->keep = true;
  else  // evicting (freeing) the entry must wait for this stream's work
    glue::record_once(entry->table_ws, entry->table_streams, stream);

  const int rc = cuda::launch_fused_update(entry->table, int(state.optimizer),
                                           float(state.clip), state.status.data_ptr<float>(),
                                           device.index(),
                                           static_cast<void*>(stream.stream()));
  FPTT_CHECK(rc == 0, "fused_update_cuda: kernel launch failed: ",
              cuda::launch_error_string(rc), " (cuda error ", rc, ")");
}

int64_t grid_size_cuda(int64_t n_chunks, int64_t optimizer, int64_t device) {
  const int64_t g = cuda::fused_update_grid_size(n_chunks, int(optimizer), int(device));
  FPTT_CHECK(g > 0, "fused_update_grid_size failed: ", cuda::launch_error_string(int(-g)));
  return g;
}

// FPTT's status [norm, last skipped, skipped count] in mapped pinned host memory
// (FPTT_FAST_STATUS=mapped; benchmarks/NOTES.md): the kernels store it through
// the device view as they store a device status (one thread, plain stores), and the host
// reads the count from the host view with no event, copy or sync. Returns (device view,
// host view) of the same 3 zeroed floats; the memory is freed (cudaFreeHost, which waits
// for the device, so not while a CUDA graph is being captured) with the last of the two.
std::tuple<at::Tensor, at::Tensor> mapped_status_cuda(int64_t device_index) {
  FPTT_CHECK(device_index >= 0 && device_index < int64_t(c10::cuda::device_count()),
             "mapped_status_cuda: no CUDA device ", device_index);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  void* host = nullptr;
  cudaError_t err = cudaHostAlloc(&host, 3 * sizeof(float), cudaHostAllocMapped |
                                                             cudaHostAllocPortable);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so that no later launch check reports it
    FPTT_CHECK(false, "mapped_status_cuda: cudaHostAlloc failed: ", cudaGetErrorString(err));
  }
  void* dev = nullptr;
  err = cudaHostGetDevicePointer(&dev, host, 0);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    cudaFreeHost(host);
    FPTT_CHECK(false, "mapped_status_cuda: cudaHostGetDevicePointer failed: ",
               cudaGetErrorString(err));
  }
  std::memset(host, 0, 3 * sizeof(float));
  std::shared_ptr<void> owner(host, [](void* p) { cudaFreeHost(p); });
  at::Tensor d = at::from_blob(
      dev, {3}, [owner](void*) {},
      at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::DeviceIndex(device_index)));
  at::Tensor h = at::from_blob(host, {3}, [owner](void*) {},
                               at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  return {d, h};
}

}  // namespace

void register_update_cuda(pybind11::module_& m) {
  m.def("fused_update_cuda", &fused_update_cuda,
        "docs/ALGORITHM.md steps 2-6 over an FpttState of CUDA fp32 tensors (fptt_fast/seam.py) "
        "in one cooperative kernel launch; writes state.status [norm, last skipped, skipped "
        "count] on the device, never syncs",
        pybind11::arg("state"));
  m.def("fused_update_cuda_grid_size", &grid_size_cuda,
        "blocks of the fused CUDA update for n_chunks chunks (optimizer code, device)",
        pybind11::arg("n_chunks"), pybind11::arg("optimizer"), pybind11::arg("device"));
  m.attr("cuda_update_chunk") = pybind11::int_(cuda::kChunk);
  m.def("mapped_status_cuda", &mapped_status_cuda,
        "(device view, host view) of a zeroed float[3] status in mapped pinned host memory "
        "(FPTT_FAST_STATUS=mapped)", pybind11::arg("device"));
}

}  // namespace fptt
