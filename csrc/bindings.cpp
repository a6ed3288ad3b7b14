// pybind11 module amoeba_core._C. Takes raw data pointers and byte sizes (never libtorch objects), so the module is
// independent of the torch version. The Python side owns every buffer and keeps it alive for the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "box_copy.h"

namespace py = pybind11;

namespace amoeba {
void register_elastic_bindings(py::module_& m);  // csrc/elastic_bindings.cpp
void register_pull_bindings(py::module_& m);     // csrc/pull_cpu.cpp
#ifdef AMOEBA_WITH_CUDA
void register_cuda_bindings(py::module_& m);  // csrc/cuda/bindings_cuda.cpp
#endif
}  // namespace amoeba

namespace {

using BoxArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

const int64_t* checked_rows(const BoxArray& boxes) {
  if (boxes.ndim() != 2 || boxes.shape(1) != amoeba::kBoxFields) {
    throw std::invalid_argument("boxes must have shape (num_boxes, " + std::to_string(amoeba::kBoxFields) +
                                "), got ndim=" + std::to_string(boxes.ndim()) +
                                (boxes.ndim() == 2 ? ", columns=" + std::to_string(boxes.shape(1)) : ""));
  }
  return boxes.data();
}

int64_t copy_boxes(uintptr_t dst, int64_t dst_nbytes, uintptr_t src, int64_t src_nbytes, const BoxArray& boxes,
                   int num_threads, bool ordered) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  const int64_t total = amoeba::validate_boxes(rows, num_boxes, src_nbytes, dst_nbytes);
  py::gil_scoped_release release;
  amoeba::copy_boxes_cpu(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), rows, num_boxes,
                         num_threads, ordered);
  return total;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "amoeba_core byte engine: batched strided copies on raw buffers (CPU, and CUDA when compiled), and "
            "elastic memory regions (a reserved address range with a mapped prefix that grows and shrinks).";
  m.attr("BOX_FIELDS") = static_cast<int>(amoeba::kBoxFields);
  m.def("copy_boxes", &copy_boxes, py::arg("dst"), py::arg("dst_nbytes"), py::arg("src"), py::arg("src_nbytes"),
        py::arg("boxes"), py::arg("num_threads") = 0, py::arg("ordered") = false,
        "Copy every box (int64 array (N, BOX_FIELDS)) from host buffer src to host buffer dst; returns bytes copied. "
        "ordered=True copies box by box with memmove semantics on one thread (for in-place relayout).");
  m.def("validate_boxes",
        [](const BoxArray& boxes, int64_t src_nbytes, int64_t dst_nbytes) {
          return amoeba::validate_boxes(checked_rows(boxes), boxes.shape(0), src_nbytes, dst_nbytes);
        },
        py::arg("boxes"), py::arg("src_nbytes"), py::arg("dst_nbytes"),
        "Check every box against the buffer sizes; returns the bytes the boxes copy; raises ValueError otherwise.");
  amoeba::register_elastic_bindings(m);
  amoeba::register_pull_bindings(m);
#ifdef AMOEBA_WITH_CUDA
  m.attr("cuda_compiled") = true;
  amoeba::register_cuda_bindings(m);
#else
  m.attr("cuda_compiled") = false;
#endif
}
