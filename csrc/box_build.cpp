// Building box arrays (box_copy.h) from columns. A planner computes box fields as whole arrays; in numpy every
// field costs several passes (gathers, multiplies, adds, then one strided write into the (N, kBoxFields) row-major
// array). Here each varying field is an affine combination of gathered integer arrays,
//   field = constant + sum_j coef_j * values_j[index_j[i]]      (values_j[i] where a term has no index),
// evaluated for every row in one pass that writes each row once.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "box_copy.h"
#include "py_arrays.h"

namespace py = pybind11;

namespace amoeba {
namespace {

using Term = std::tuple<int64_t, BoxArray, std::optional<BoxArray>>;  // (coef, values, index or None)
using Column = std::tuple<int, int64_t, std::vector<Term>>;           // (field, constant, terms)

struct CheckedTerm {
  int64_t coef;
  const int64_t* values;
  const int64_t* index;  // null: values[i]
};

struct CheckedColumn {
  int field;
  int64_t constant;
  std::vector<CheckedTerm> terms;
};

std::string where(int field, size_t term) {
  return "assemble_boxes: field " + std::to_string(field) + ", term " + std::to_string(term) + ": ";
}

py::array_t<int64_t> assemble_boxes(const BoxArray& row, const std::vector<Column>& columns, int64_t num_boxes) {
  if (row.ndim() != 1 || row.shape(0) != kBoxFields) {
    throw std::invalid_argument("assemble_boxes: row must have shape (" + std::to_string(kBoxFields) + ",)");
  }
  if (num_boxes < 0) throw std::invalid_argument("assemble_boxes: num_boxes must be >= 0");
  std::vector<CheckedColumn> checked;
  for (const auto& [field, constant, terms] : columns) {
    if (field < 0 || field >= kBoxFields) {
      throw std::invalid_argument("assemble_boxes: field " + std::to_string(field) + " is outside [0, " +
                                  std::to_string(kBoxFields) + ")");
    }
    CheckedColumn c{field, constant, {}};
    for (size_t j = 0; j < terms.size(); ++j) {
      const auto& [coef, values, index] = terms[j];
      if (values.ndim() != 1) throw std::invalid_argument(where(field, j) + "values must be one-dimensional");
      const int64_t n_values = values.shape(0);
      if (!index) {
        if (n_values != num_boxes) {
          throw std::invalid_argument(where(field, j) + "values has " + std::to_string(n_values) +
                                      " entries, expected " + std::to_string(num_boxes));
        }
        c.terms.push_back({coef, values.data(), nullptr});
        continue;
      }
      if (index->ndim() != 1 || index->shape(0) != num_boxes) {
        throw std::invalid_argument(where(field, j) + "index must have " + std::to_string(num_boxes) + " entries");
      }
      const int64_t* idx = index->data();
      for (int64_t i = 0; i < num_boxes; ++i) {
        if (idx[i] < 0 || idx[i] >= n_values) {
          throw std::invalid_argument(where(field, j) + "index[" + std::to_string(i) + "] = " +
                                      std::to_string(idx[i]) + " is outside [0, " + std::to_string(n_values) + ")");
        }
      }
      c.terms.push_back({coef, values.data(), idx});
    }
    checked.push_back(std::move(c));
  }
  py::array_t<int64_t> out({num_boxes, static_cast<int64_t>(kBoxFields)});
  int64_t* rows = out.mutable_data();
  int64_t base[kBoxFields];
  std::memcpy(base, row.data(), sizeof(base));
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < num_boxes; ++i) {
      int64_t* r = rows + i * kBoxFields;
      std::memcpy(r, base, sizeof(base));
      for (const CheckedColumn& c : checked) {
        int64_t v = c.constant;
        for (const CheckedTerm& t : c.terms) v += t.coef * t.values[t.index ? t.index[i] : i];
        r[c.field] = v;
      }
    }
  }
  return out;
}

}  // namespace

void register_box_build_bindings(py::module_& m) {
  m.def("assemble_boxes", &assemble_boxes, py::arg("row"), py::arg("columns"), py::arg("num_boxes"),
        "A (num_boxes, BOX_FIELDS) int64 box array: every row is `row` (BOX_FIELDS values) except the fields of "
        "`columns`, [(field, constant, [(coef, values, index or None)])]: row i's field is constant + sum of "
        "coef * values[index[i]] (values[i] without an index) over the terms (int64 arrays; indices checked). One "
        "pass that writes every row once.");
}

}  // namespace amoeba
