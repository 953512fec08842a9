// pybind11 conversions of seam.h's structs from their Python twins (fptt_fast/seam.py):
// any object with the struct's field names as attributes converts, field by field, so a
// binding argument declared FpttState, SegmentIO or SegmentConfig takes the twin. A field
// of the wrong type raises TypeError naming it. Conversion only (nothing goes back).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

#include "fptt_fast/seam.h"

namespace fptt {
namespace seam_detail {

namespace py = pybind11;

template <typename T>
void read(py::handle src, const char* type, const char* field, T* out) {
  py::object v = py::getattr(src, field);
  try {
    *out = v.cast<T>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(type) + "." + field + " has the wrong type (" +
                         std::string(py::str(py::type::of(v).attr("__name__"))) + ")");
  }
}

// An optional tensor: None leaves it undefined.
inline void read_tensor(py::handle src, const char* type, const char* field, at::Tensor* out) {
  py::object v = py::getattr(src, field);
  if (v.is_none()) {
    *out = at::Tensor();
    return;
  }
  read(src, type, field, out);
}

// One field: a tensor may be None, anything else must convert.
template <typename T>
void read_field(py::handle src, const char* type, const char* field, T* out) {
  read(src, type, field, out);
}
inline void read_field(py::handle src, const char* type, const char* field, at::Tensor* out) {
  read_tensor(src, type, field, out);
}

// A struct's fields by name: fields("x", &S::x, "y", &S::y, ...) read into `value`.
template <typename S>
void read_fields(py::handle, const char*, S&) {}
template <typename S, typename M, typename... Rest>
void read_fields(py::handle src, const char* type, S& value, const char* name, M S::*member,
                 Rest... rest) {
  read_field(src, type, name, &(value.*member));
  read_fields(src, type, value, rest...);
}

}  // namespace seam_detail
}  // namespace fptt

// One struct's caster: loads from any object that has `key` (a field only that struct's
// twin has) by reading the listed fields; never converts back.
#define FPTT_SEAM_CASTER(Type, key, ...)                                               \
  template <>                                                                          \
  struct type_caster<fptt::Type> {                                                     \
    PYBIND11_TYPE_CASTER(fptt::Type, const_name(#Type));                               \
    bool load(handle src, bool) {                                                      \
      if (!hasattr(src, key)) return false;                                            \
      using S = fptt::Type;                                                            \
      fptt::seam_detail::read_fields(src, #Type, value, __VA_ARGS__);                  \
      return true;                                                                     \
    }                                                                                  \
    static handle cast(const fptt::Type&, return_value_policy, handle) {               \
      throw type_error(#Type " does not convert back to Python");                      \
    }                                                                                  \
  };

namespace pybind11 {
namespace detail {

FPTT_SEAM_CASTER(FpttState, "w_bar", "params", &S::params, "grads", &S::grads, "w_bar",
                 &S::w_bar, "lam", &S::lam, "exp_avg", &S::exp_avg, "exp_avg_sq",
                 &S::exp_avg_sq, "step", &S::step, "hyper", &S::hyper, "group_of",
                 &S::group_of, "optimizer", &S::optimizer, "clip", &S::clip, "status",
                 &S::status)
FPTT_SEAM_CASTER(SegmentIO, "h0", "x", &S::x, "target", &S::target, "h0", &S::h0, "c0",
                 &S::c0, "h_out", &S::h_out, "c_out", &S::c_out, "losses", &S::losses,
                 "dh_seq", &S::dh_seq, "dx", &S::dx, "h_seq", &S::h_seq)
FPTT_SEAM_CASTER(SegmentConfig, "n_segs", "weight", &S::weight, "loss", &S::loss, "per_step",
                 &S::per_step, "update", &S::update, "n_segs", &S::n_segs, "ramp", &S::ramp,
                 "tf32", &S::tf32, "kernel", &S::kernel, "builtin_gemm", &S::builtin_gemm,
                 "head", &S::head, "forward_only", &S::forward_only)

}  // namespace detail
}  // namespace pybind11

#undef FPTT_SEAM_CASTER
