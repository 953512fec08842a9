// FPTT fused update on the CPU: OpenMP over fixed-size chunks of all tensors.
#include <math.h>

#include <string.h>

#include <vector>

#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/fptt_math.h"

namespace fptt {
namespace cpu {
namespace {

// Chunks are the unit of parallel work and of the norm's partial sums; a fixed
// size makes the summation order (and so the result) independent of threads.
constexpr int64_t kChunk = 8192;

// Below this many elements in all both passes run on the calling thread. Waking the
// OpenMP team costs more than that much work: on a 2-core VM busy with other work,
// FPTT.step() on six tiny tensors took 0.5-0.9 ms with the team against ~50 us with
// OMP_NUM_THREADS=1, both through the old Python list path. Elements, not
// chunks: every tensor, however small, is at least one chunk. The results do not depend
// on it (fixed chunks, partial sums added in chunk order).
constexpr int64_t kParallelMinElements = 4 * kChunk;

// f(k) for k in [0, n): in an OpenMP team if `parallel`, else in a plain loop. Not an
// if() clause: libgomp still builds (mallocs) and tears down a one-thread team for a
// parallel region whose if() is false, a few microseconds per region here.
template <class F>
void for_each_chunk(int64_t n, bool parallel, const F& f) {
  if (parallel) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n; ++k) f(k);
  } else {
    for (int64_t k = 0; k < n; ++k) f(k);
  }
}

// The two element loops are built three times, for AVX-512, AVX2 and baseline x86-64, and
// picked at load time (GCC function multiversioning): 16- or 8-wide sqrt/div where the CPU
// has it, the same IEEE results in each (no -ffast-math; setup.py's -ffp-contract=off).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FPTT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FPTT_CPU_CLONES
#endif

struct Chunk {
  int slot;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const UpdateSlot* slots, int n_slots) {
  std::vector<Chunk> chunks;
  for (int s = 0; s < n_slots; ++s)
    for (int64_t b = 0; b < slots[s].n; b += kChunk)
      chunks.push_back({s, b, b + kChunk < slots[s].n ? b + kChunk : slots[s].n});
  return chunks;
}

// Sum of squares of the regularised gradient over [begin, end), in double. Eight
// fixed lanes, summed in a fixed order: vectorisable yet independent of threads.
FPTT_CPU_CLONES double chunk_sumsq(const UpdateSlot& t, int64_t begin, int64_t end) {
  constexpr int kLanes = 8;
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t j = i + l;
      const double g = norm_input(t.g[j], t.w[j], t.w_bar[j], t.lam[j], t.hyper);
      lane[l] += g * g;
    }
  }
  double acc = 0.0;
  for (; i < end; ++i) {
    const double g = norm_input(t.g[i], t.w[i], t.w_bar[i], t.lam[i], t.hyper);
    acc += g * g;
  }
  for (int l = 0; l < kLanes; ++l) acc += lane[l];
  return acc;
}

template <int OPT>
FPTT_CPU_CLONES void chunk_update(const UpdateSlot& t, int64_t begin, int64_t end, const StepScalars& s) {
  float* __restrict w = t.w;
  const float* __restrict g = t.g;
  float* __restrict w_bar = t.w_bar;
  float* __restrict lam = t.lam;
  float* __restrict s1 = t.s1;
  // SGD has no second buffer and never touches it: alias s1 so the loop has one shape.
  float* s2 = OPT == OPT_SGD ? t.s1 : t.s2;
  // The hyper-parameters and scalars as locals: read through t.hyper, every store to s2
  // (which may alias s1, so is not __restrict) could change them, and the loop would not
  // vectorise.
  float hyper[H_COUNT];
  memcpy(hyper, t.hyper, sizeof hyper);
  const StepScalars sc = s;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i)
    update_element<OPT>(w[i], g[i], w_bar[i], lam[i], s1[i], s2[i], hyper, sc);
}

template <int OPT>
void update_pass(const UpdateSlot* slots, int n_slots, const std::vector<Chunk>& chunks,
                 float coef, bool parallel) {
  std::vector<StepScalars> scal(n_slots);
  for (int s = 0; s < n_slots; ++s) scal[s] = step_scalars(slots[s].hyper, *slots[s].step, coef);
  const int64_t n_chunks = int64_t(chunks.size());
  for_each_chunk(n_chunks, parallel, [&](int64_t k) {
    const Chunk& c = chunks[k];
    chunk_update<OPT>(slots[c.slot], c.begin, c.end, scal[c.slot]);
  });
  for (int s = 0; s < n_slots; ++s) *slots[s].step += 1.f;
}

}  // namespace

UpdateResult fused_update(const UpdateSlot* slots, int n_slots, int optimizer, float clip) {
  const std::vector<Chunk> chunks = make_chunks(slots, n_slots);
  const int64_t n_chunks = int64_t(chunks.size());
  std::vector<double> partial(n_chunks);
  int64_t elements = 0;
  for (int s = 0; s < n_slots; ++s) elements += slots[s].n;
  const bool parallel = n_chunks > 1 && elements >= kParallelMinElements;
  for_each_chunk(n_chunks, parallel, [&](int64_t k) {
    partial[k] = chunk_sumsq(slots[chunks[k].slot], chunks[k].begin, chunks[k].end);
  });
  double sumsq = 0.0;
  for (int64_t k = 0; k < n_chunks; ++k) sumsq += partial[k];
  const double norm = sqrt(sumsq);
  // finite as the float32 the reference computes: a double norm beyond FLT_MAX is not
  if (!isfinite(float(norm))) return {norm, true};
  const float coef = clip_coefficient(norm, clip);
  switch (optimizer) {
    case OPT_SGD: update_pass<OPT_SGD>(slots, n_slots, chunks, coef, parallel); break;
    case OPT_ADAM: update_pass<OPT_ADAM>(slots, n_slots, chunks, coef, parallel); break;
    default: update_pass<OPT_ADAMW>(slots, n_slots, chunks, coef, parallel); break;
  }
  return {norm, false};
}

}  // namespace cpu
}  // namespace fptt
