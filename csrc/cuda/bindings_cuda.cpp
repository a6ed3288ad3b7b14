// pybind11 bindings of the CUDA byte engine (called from PYBIND11_MODULE in csrc/bindings.cpp).
// Only raw device pointers, a device index and a stream handle cross this boundary, so nothing here depends on
// libtorch. Every argument is checked before the first CUDA call, so a bad box never reaches the device.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "../box_copy.h"
#include "../ordered_phases.h"
#include "../py_arrays.h"
#include "box_copy_cuda.h"

namespace py = pybind11;

namespace amoeba {

namespace {

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

int64_t copy_boxes_bases_cuda_py(const BaseArray& dst_bases, int64_t dst_nbytes, const BaseArray& src_bases,
                                 int64_t src_nbytes, const BoxArray& boxes, uintptr_t descriptors,
                                 int64_t descriptor_nbytes, int device, uintptr_t stream) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  const std::vector<uint64_t> dst = checked_bases(dst_bases, "dst_bases", -1);
  const std::vector<uint64_t> src = checked_bases(src_bases, "src_bases", static_cast<int64_t>(dst.size()));
  const int64_t per_layer = validate_boxes(rows, num_boxes, src_nbytes, dst_nbytes);
  if (per_layer == 0) return 0;
  // Host-side preparation of ~1e6 boxes takes milliseconds; let other Python threads run meanwhile.
  // `boxes` stays alive: the caller holds a reference for the duration of the call.
  py::gil_scoped_release release;
  copy_boxes_bases_cuda(dst.data(), src.data(), static_cast<int64_t>(dst.size()), rows, num_boxes,
                        as_ptr(descriptors), static_cast<size_t>(std::max<int64_t>(0, descriptor_nbytes)), device,
                        as_ptr(stream));
  return per_layer * static_cast<int64_t>(dst.size());
}

int64_t copy_boxes_cuda_py(uintptr_t dst, int64_t dst_nbytes, uintptr_t src, int64_t src_nbytes,
                           const BoxArray& boxes, uintptr_t descriptors, int64_t descriptor_nbytes, int device,
                           uintptr_t stream) {
  BaseArray dst_bases(1), src_bases(1);
  dst_bases.mutable_data()[0] = dst;
  src_bases.mutable_data()[0] = src;
  return copy_boxes_bases_cuda_py(dst_bases, dst_nbytes, src_bases, src_nbytes, boxes, descriptors,
                                  descriptor_nbytes, device, stream);
}

void copy_phases_cuda_py(const BaseArray& buf_bases, int64_t buf_nbytes, const BaseArray& scratch_bases,
                         int64_t scratch_nbytes, const KindArray& kinds, const BoxArray& starts,
                         const BoxArray& rows, uintptr_t descriptors, int64_t descriptor_nbytes, int device,
                         uintptr_t stream) {
  const int64_t phases = checked_phase_table(kinds, starts, rows);
  const std::vector<uint64_t> bufs = checked_bases(buf_bases, "buf_bases", -1);
  std::vector<uint64_t> scratch(bufs.size(), 0);
  if (scratch_nbytes > 0) scratch = checked_bases(scratch_bases, "scratch_bases", static_cast<int64_t>(bufs.size()));
  validate_phases(kinds.data(), phases, starts.data(), rows.data(), rows.shape(0), buf_nbytes, scratch_nbytes);
  if (phases == 0) return;
  py::gil_scoped_release release;
  copy_phases_cuda(bufs.data(), scratch.data(), static_cast<int64_t>(bufs.size()), kinds.data(), phases,
                   starts.data(), rows.data(), as_ptr(descriptors),
                   static_cast<size_t>(std::max<int64_t>(0, descriptor_nbytes)), device, as_ptr(stream));
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("cuda_descriptor_bytes",
        [](int64_t num_rows, int64_t num_launches, int64_t num_layers) {
          if (num_rows < 0 || num_launches < 0 || num_layers < 1)
            throw std::invalid_argument("cuda_descriptor_bytes: counts must be >= 0 and num_layers >= 1");
          return static_cast<int64_t>(cuda_descriptor_bytes(num_rows, num_launches, num_layers));
        },
        py::arg("num_rows"), py::arg("num_launches") = 1, py::arg("num_layers") = 1,
        "Device bytes the descriptors of one call need at most (boxes, launches: 1 for a copy, one per phase "
        "for copy_phases_cuda, layers). Allocate them on the call's stream (a torch uint8 tensor).");
  m.def("copy_boxes_cuda", &copy_boxes_cuda_py, py::arg("dst"), py::arg("dst_nbytes"), py::arg("src"),
        py::arg("src_nbytes"), py::arg("boxes"), py::arg("descriptors"), py::arg("descriptor_nbytes"),
        py::arg("device") = -1, py::arg("stream") = 0,
        "Copy every box (int64 array (N, BOX_FIELDS), host memory) from device buffer src to device buffer dst "
        "with one kernel launch on `stream` (cudaStream_t as int, 0 = legacy default stream) of `device` (-1: "
        "current; the caller's device is restored); descriptors: device memory of descriptor_nbytes >= "
        "cuda_descriptor_bytes(N) bytes allocated on that stream. Returns bytes copied. Asynchronous with respect "
        "to the host. Raises ValueError for a bad box or a short descriptor buffer (before any CUDA call) and "
        "CudaError when a CUDA call fails. src and dst ranges must not overlap.");
  m.def("copy_boxes_bases_cuda", &copy_boxes_bases_cuda_py, py::arg("dst_bases"), py::arg("dst_nbytes"),
        py::arg("src_bases"), py::arg("src_nbytes"), py::arg("boxes"), py::arg("descriptors"),
        py::arg("descriptor_nbytes"), py::arg("device") = -1, py::arg("stream") = 0,
        "copy_boxes_cuda applied to every pair (dst_bases[l], src_bases[l]) (uint64 address arrays of equal "
        "length L) in ONE launch; descriptor_nbytes >= cuda_descriptor_bytes(N, 1, L). Returns bytes copied over "
        "all pairs.");
  m.def("copy_phases_cuda", &copy_phases_cuda_py, py::arg("buf_bases"), py::arg("buf_nbytes"),
        py::arg("scratch_bases"), py::arg("scratch_nbytes"), py::arg("kinds"), py::arg("starts"), py::arg("rows"),
        py::arg("descriptors"), py::arg("descriptor_nbytes"), py::arg("device") = -1, py::arg("stream") = 0,
        "Run a phase table (plan_ordered_phases) on device buffers buf_bases[l] with scratch scratch_bases[l]: "
        "one launch per phase over all buffers, descriptors (>= cuda_descriptor_bytes(M, P, L) bytes) uploaded "
        "once. The table is checked against the sizes first.");
  m.def("cuda_device_count", &cuda_device_count,
        "Number of visible CUDA devices as seen by the engine's CUDA runtime; 0 without a driver or GPU.");
}

}  // namespace amoeba
