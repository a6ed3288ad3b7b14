// CUDA byte engine: host entry points shared by box_copy_cuda.cu (nvcc) and bindings_cuda.cpp (host compiler).
// Kept free of CUDA headers so the pybind11 translation unit builds with the plain C++ compiler.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace amoeba {

// A failed CUDA runtime call or kernel launch. The message names the call and the CUDA error
// (cudaGetErrorName + cudaGetErrorString). Surfaces in Python as amoeba_core._C.CudaError (a RuntimeError).
class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

// Copies every box (rows: num_boxes x kBoxFields, host memory, already validated) from device buffer `src` to
// device buffer `dst` with one kernel launch, stream-ordered on `stream` (a cudaStream_t; 0 = legacy default).
// Asynchronous: returns once the work is enqueued; `rows` may be freed on return. Source and destination ranges
// must not overlap. Throws CudaError when a CUDA call fails.
void copy_boxes_cuda(uint8_t* dst, const uint8_t* src, const int64_t* rows, int64_t num_boxes, void* stream);

// Number of visible CUDA devices; 0 when there is no driver or device. Never throws.
int cuda_device_count() noexcept;

}  // namespace amoeba
