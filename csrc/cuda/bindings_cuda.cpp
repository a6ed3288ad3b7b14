// pybind11 bindings of the CUDA byte engine (called from PYBIND11_MODULE in csrc/bindings.cpp).
// Only raw device pointers and a stream handle cross this boundary, so nothing here depends on libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "../box_copy.h"
#include "box_copy_cuda.h"

namespace py = pybind11;

namespace amoeba {

namespace {

using BoxArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

int64_t copy_boxes_cuda_py(uintptr_t dst, int64_t dst_nbytes, uintptr_t src, int64_t src_nbytes,
                           const BoxArray& boxes, uintptr_t stream) {
  if (boxes.ndim() != 2 || boxes.shape(1) != kBoxFields) {
    throw std::invalid_argument("boxes must have shape (num_boxes, " + std::to_string(kBoxFields) +
                                "), got ndim=" + std::to_string(boxes.ndim()) +
                                (boxes.ndim() == 2 ? ", columns=" + std::to_string(boxes.shape(1)) : ""));
  }
  const int64_t* rows = boxes.data();
  const int64_t num_boxes = boxes.shape(0);
  // Validation happens before any CUDA call, so a bad box never reaches the device.
  const int64_t total = validate_boxes(rows, num_boxes, src_nbytes, dst_nbytes);
  if (total == 0) return 0;
  if (dst == 0 || src == 0) throw std::invalid_argument("copy_boxes_cuda: null dst or src pointer");
  // Host-side preparation of ~1e6 boxes takes milliseconds; let other Python threads run meanwhile.
  // `boxes` stays alive: the caller holds a reference for the duration of the call.
  py::gil_scoped_release release;
  copy_boxes_cuda(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), rows, num_boxes,
                  reinterpret_cast<void*>(stream));
  return total;
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("copy_boxes_cuda", &copy_boxes_cuda_py, py::arg("dst"), py::arg("dst_nbytes"), py::arg("src"),
        py::arg("src_nbytes"), py::arg("boxes"), py::arg("stream") = 0,
        "Copy every box (int64 array (N, BOX_FIELDS), host memory) from device buffer src to device buffer dst "
        "with one kernel launch on `stream` (cudaStream_t as int, 0 = legacy default stream); returns bytes "
        "copied. Asynchronous with respect to the host. Raises ValueError for a bad box (before any CUDA call) "
        "and CudaError when a CUDA call fails. src and dst ranges must not overlap.");
  m.def("cuda_device_count", &cuda_device_count,
        "Number of visible CUDA devices as seen by the engine's CUDA runtime; 0 without a driver or GPU.");
}

}  // namespace amoeba
