// Error messages of fptt_fast._C, built without iostreams: FPTT_CHECK(cond, parts...).
//
// Why not TORCH_CHECK(cond, "n=", n) as torch's own code does: TORCH_CHECK formats its parts
// with c10::str, i.e. a std::ostringstream instantiated in *this* library, and on the GPU
// image (torch 2.11+cu130 wheels, Ubuntu 24.04's g++/libstdc++ 13) writing a number through
// such a stream crashes the process (SIGSEGV in std::ostream::_M_insert<long>, the call
// landing in std::codecvt<char16_t>::do_unshift: a locale facet looked up under another
// facet's id, the symptom of two copies of libstdc++'s locale machinery in one process, cf.
// pytorch/pytorch#109923). Measured there on 2026-11-27: a minimal torch extension built with
// load_inline crashes on TORCH_CHECK(false, "got ", 1) and survives throw
// std::runtime_error; every binding test expecting a RuntimeError crashed its worker.
// So the message is assembled here with std::to_string / snprintf (no locale facets), and
// TORCH_CHECK receives ONE std::string, which c10::str passes through untouched. The
// message is still built only when the check fails.
//
// tests/test_cuda_sources.py checks that csrc/ has no other TORCH_CHECK with a message and
// no operator<< on streams, so the crash cannot come back through a new check.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace fptt {
namespace msg {

inline void put(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                        !std::is_same_v<T, char>,
                                    int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  s += buf;
}
inline void put(std::string& s, float v) { put(s, double(v)); }
// shapes and strides as torch prints them: [2, 3]
inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }  // "cuda:0"
inline void put(std::string& s, c10::Layout l) {
  s += l == c10::kStrided ? "Strided" : l == c10::kSparse ? "Sparse" : "non-strided";
}

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string s;
  (put(s, parts), ...);
  return s;
}

}  // namespace msg
}  // namespace fptt

// TORCH_CHECK (a c10::Error, i.e. a Python RuntimeError) with an iostream-free message.
#define FPTT_CHECK(cond, ...) TORCH_CHECK(cond, ::fptt::msg::cat(__VA_ARGS__))
