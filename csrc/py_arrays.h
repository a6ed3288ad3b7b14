// Checked views of the numpy arrays the bindings take (csrc/bindings.cpp, csrc/cuda/bindings_cuda.cpp).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "box_copy.h"

namespace amoeba {

using BoxArray = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;
using BaseArray = pybind11::array_t<uint64_t, pybind11::array::c_style | pybind11::array::forcecast>;
using KindArray = pybind11::array_t<int8_t, pybind11::array::c_style | pybind11::array::forcecast>;

// Rows of a (num_boxes, kBoxFields) box array.
inline const int64_t* checked_rows(const BoxArray& boxes) {
  if (boxes.ndim() != 2 || boxes.shape(1) != kBoxFields) {
    throw std::invalid_argument("boxes must have shape (num_boxes, " + std::to_string(kBoxFields) +
                                "), got ndim=" + std::to_string(boxes.ndim()) +
                                (boxes.ndim() == 2 ? ", columns=" + std::to_string(boxes.shape(1)) : ""));
  }
  return boxes.data();
}

// Buffer addresses of a base table: one dimension, at least one entry, no null address, `expected` entries when
// expected >= 0.
inline std::vector<uint64_t> checked_bases(const BaseArray& bases, const char* what, int64_t expected) {
  if (bases.ndim() != 1 || bases.shape(0) == 0) {
    throw std::invalid_argument(std::string(what) + " must be a non-empty one-dimensional array of addresses");
  }
  if (expected >= 0 && bases.shape(0) != expected) {
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(bases.shape(0)) +
                                " entries, expected " + std::to_string(expected));
  }
  std::vector<uint64_t> out(bases.data(), bases.data() + bases.shape(0));
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] == 0) throw std::invalid_argument(std::string(what) + "[" + std::to_string(i) + "] is null");
  }
  return out;
}

// Shape checks of a phase table (kinds (P,), starts (P + 1,), rows (M, kBoxFields)); returns P.
inline int64_t checked_phase_table(const KindArray& kinds, const BoxArray& starts, const BoxArray& rows) {
  checked_rows(rows);
  if (kinds.ndim() != 1 || starts.ndim() != 1 || starts.shape(0) != kinds.shape(0) + 1) {
    throw std::invalid_argument("phase table: kinds must be 1-D (P,) and starts 1-D (P + 1,)");
  }
  return kinds.shape(0);
}

}  // namespace amoeba
