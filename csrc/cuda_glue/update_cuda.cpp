// Torch glue of the fused FPTT update on CUDA: checks (update_checks.h), the device-side
// slot table (cached), and the launch of csrc/cuda/fused_update.cu on torch's current stream.
// Built only with FPTT_WITH_CUDA (setup.py's CUDAExtension); registry.h calls
// register_update_cuda(m).
//
// The slot table (pointers, sizes, chunk offsets; cuda_kernels.h) lives in device
// memory next to the kernel's scratch (per-chunk partial sums, per-slot scalars), in one
// workspace tensor. Workspaces are cached keyed by the full pointer tuple of the step
// (device, every slot's w/g/w_bar/lam/s1/s2/step/hyper-row pointers and sizes), so a
// steady-state step does no host-to-device copy at all: the glue only compares the key
// and launches. When the key changes (new parameters, grads re-allocated, a new hyper
// table...), the table is written into a pinned staging tensor and copied with a
// non-blocking copy on the current stream (torch's copy_ records the staging buffer's
// use on that stream, so freeing it right after is safe).
//
// CUDA graphs: a step captured in a graph uses the cached workspace of its key; the
// entry is then marked "kept" and never evicted (the graph holds its raw pointers).
// A cache miss while capturing raises: the table copy would have to be captured too.
// Run a step eagerly first (torch's recipe warms up before capture anyway).
// One optimiser's steps must not run concurrently on two streams (they share scratch).
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
#include <mutex>
#include <vector>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/update_checks.h"

namespace fptt {
namespace {

struct TableEntry {
  std::vector<int64_t> key;
  at::Tensor workspace;                 // device uint8 [WorkspaceLayout::total_bytes]
  cuda::UpdateTable table;              // device pointers into workspace
  c10::StreamId alloc_stream = 0;       // stream the workspace was allocated on
  std::vector<c10::StreamId> recorded;  // other streams recorded on the workspace
  bool keep = false;                    // referenced by a captured CUDA graph
  uint64_t last_use = 0;
};

constexpr size_t kMaxEntries = 8;
std::mutex g_mutex;
std::list<TableEntry> g_cache;  // list: entries never move, table pointers stay valid
uint64_t g_clock = 0;

float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

bool stream_is_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  return st != cudaStreamCaptureStatusNone;
}

TableEntry& build_entry(std::vector<cuda::UpdateSlot>&& slots, std::vector<int64_t>&& key,
                        const c10::Device& device, const at::cuda::CUDAStream& stream) {
  const int n_slots = int(slots.size());
  int64_t n_chunks = 0;
  for (auto& s : slots) {
    s.chunk_begin = n_chunks;
    n_chunks += cuda::chunks_of(s.n);
  }
  const cuda::WorkspaceLayout L = cuda::workspace_layout(n_slots, n_chunks);
  const size_t table_bytes = sizeof(cuda::UpdateSlot) * size_t(n_slots);

  at::Tensor staging = at::empty({int64_t(table_bytes)},
                                 at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), slots.data(), table_bytes);
  at::Tensor ws = at::empty({int64_t(L.total_bytes)},
                            at::TensorOptions().dtype(at::kByte).device(device));
  ws.narrow(0, int64_t(L.slots_offset), int64_t(table_bytes)).copy_(staging, /*non_blocking=*/true);

  // Evict the least recently used entry that no graph holds, if the cache is full.
  if (g_cache.size() >= kMaxEntries) {
    auto victim = g_cache.end();
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it)
      if (!it->keep && (victim == g_cache.end() || it->last_use < victim->last_use)) victim = it;
    if (victim != g_cache.end()) g_cache.erase(victim);
  }
  TableEntry e;
  e.key = std::move(key);
  e.workspace = ws;
  uint8_t* base = static_cast<uint8_t*>(ws.data_ptr());
  e.table.slots = reinterpret_cast<const cuda::UpdateSlot*>(base + L.slots_offset);
  e.table.n_slots = n_slots;
  e.table.n_chunks = n_chunks;
  e.table.scalars = reinterpret_cast<cuda::SlotScalars*>(base + L.scalars_offset);
  e.table.partials = reinterpret_cast<double*>(base + L.partials_offset);
  e.alloc_stream = stream.id();
  g_cache.push_front(std::move(e));
  return g_cache.front();
}

void fused_update_cuda(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                       std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
                       std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s,
                       std::vector<at::Tensor> steps, at::Tensor hyper,
                       std::vector<int64_t> group_of, int64_t optimizer, double clip,
                       at::Tensor status) {
  // Every check before any data pointer is taken (update_checks.h: the same code as
  // fused_update_cpu's, tested on CPU CI through _C._check_fused_update_args): lengths,
  // devices (one CUDA device for all, status and hyper included), dtypes, contiguity,
  // sizes, codes, group indices, and no output overlapping another argument.
  const c10::Device device =
      checks::check_fused_update_args("fused_update_cuda", params, grads, w_bars, lams, s1s, s2s,
                                      steps, hyper, group_of, optimizer, clip, &status, at::kCUDA);
  const size_t n = params.size();
  if (n == 0) return;

  c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(device.index());
  const bool sgd = optimizer == OPT_SGD;

  std::vector<cuda::UpdateSlot> slots(n);
  std::vector<int64_t> key;
  key.reserve(2 + 9 * n);
  key.push_back(device.index());
  key.push_back(sgd);
  const float* hp = hyper.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    cuda::UpdateSlot& s = slots[i];
    s.w = fptr(params[i]);
    s.g = fptr(grads[i]);
    s.w_bar = fptr(w_bars[i]);
    s.lam = fptr(lams[i]);
    s.s1 = fptr(s1s[i]);
    s.s2 = sgd ? nullptr : fptr(s2s[i]);
    s.step = fptr(steps[i]);
    s.hyper = hp + group_of[i] * H_COUNT;
    s.n = params[i].numel();
    s.chunk_begin = 0;  // set by build_entry
    for (const void* p : {(const void*)s.w, (const void*)s.g, (const void*)s.w_bar,
                          (const void*)s.lam, (const void*)s.s1, (const void*)s.s2,
                          (const void*)s.step, (const void*)s.hyper})
      key.push_back(int64_t(reinterpret_cast<intptr_t>(p)));
    key.push_back(s.n);
  }

  const bool capturing = stream_is_capturing(stream.stream());
  std::lock_guard<std::mutex> lock(g_mutex);
  TableEntry* entry = nullptr;
  for (auto& e : g_cache)
    if (e.key == key) {
      entry = &e;
      break;
    }
  if (entry == nullptr) {
    FPTT_CHECK(!capturing,
                "fused_update_cuda: the parameters, gradients, state or hyper-parameter table "
                "changed while capturing a CUDA graph; run one step eagerly (warm-up) with the "
                "same tensors before capturing");
    entry = &build_entry(std::move(slots), std::move(key), device, stream);
  }
  entry->last_use = ++g_clock;
  if (capturing) {
    entry->keep = true;
  } else if (stream.id() != entry->alloc_stream &&
             std::find(entry->recorded.begin(), entry->recorded.end(), stream.id()) ==
                 entry->recorded.end()) {
    // Used on another stream than the one it was allocated on: tell the caching
    // allocator, so that evicting (freeing) the entry waits for this stream's work.
    entry->workspace.record_stream(stream);
    entry->recorded.push_back(stream.id());
  }

  const int rc = cuda::launch_fused_update(entry->table, int(optimizer), float(clip),
                                           status.data_ptr<float>(), device.index(),
                                           static_cast<void*>(stream.stream()));
  FPTT_CHECK(rc == 0, "fused_update_cuda: kernel launch failed: ",
              cuda::launch_error_string(rc), " (cuda error ", rc, ")");
}

int64_t grid_size_cuda(int64_t n_chunks, int64_t optimizer, int64_t device) {
  const int64_t g = cuda::fused_update_grid_size(n_chunks, int(optimizer), int(device));
  FPTT_CHECK(g > 0, "fused_update_grid_size failed: ", cuda::launch_error_string(int(-g)));
  return g;
}

}  // namespace

void register_update_cuda(pybind11::module_& m) {
  m.def("fused_update_cuda", &fused_update_cuda,
        "FPTT steps 2-6 over lists of CUDA fp32 tensors in one cooperative kernel launch; "
        "writes status [norm, last skipped, skipped count] on the device, never syncs",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("w_bars"),
        pybind11::arg("lams"), pybind11::arg("s1s"), pybind11::arg("s2s"),
        pybind11::arg("steps"), pybind11::arg("hyper"), pybind11::arg("group_of"),
        pybind11::arg("optimizer"), pybind11::arg("clip"), pybind11::arg("status"));
  m.def("fused_update_cuda_grid_size", &grid_size_cuda,
        "blocks of the fused CUDA update for n_chunks chunks (optimizer code, device)",
        pybind11::arg("n_chunks"), pybind11::arg("optimizer"), pybind11::arg("device"));
  m.attr("cuda_update_chunk") = pybind11::int_(cuda::kChunk);
}

}  // namespace fptt
