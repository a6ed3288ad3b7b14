// CUDA byte engine: host entry points shared by box_copy_cuda.cu (nvcc) and bindings_cuda.cpp (host compiler).
// Kept free of CUDA headers so the pybind11 translation unit builds with the plain C++ compiler.
#pragma once

#include <cstddef>
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

// Bytes of device memory the descriptors of one call need at most: num_rows boxes over num_launches launches
// (copy_boxes_bases_cuda: 1; copy_phases_cuda: one per phase) and num_layers layers. The caller allocates that
// much device memory on the call's stream (from its own allocator) and passes it as `descriptors`.
size_t cuda_descriptor_bytes(int64_t num_rows, int64_t num_launches, int64_t num_layers);

// Copies every box (rows: num_boxes x kBoxFields, host memory, already validated against the buffer sizes) from
// src_bases[l] to dst_bases[l] for every layer l < num_layers, with ONE kernel launch on `stream` (a cudaStream_t;
// 0 = legacy default) of `device` (< 0: the current device; the caller's current device is restored). The
// descriptors are uploaded from pinned memory into `descriptors` (device memory of descriptor_nbytes bytes,
// stream-ordered: it must stay allocated until the kernel has run, which the torch caching allocator guarantees
// for a tensor allocated on `stream`). Asynchronous: returns once the work is enqueued; `rows` may be freed on
// return. Within a layer sources and destinations must not overlap, nor may layers overlap one another's
// destinations. Throws std::invalid_argument for a descriptor buffer that is too small, CudaError when a CUDA
// call fails.
void copy_boxes_bases_cuda(const uint64_t* dst_bases, const uint64_t* src_bases, int64_t num_layers,
                           const int64_t* rows, int64_t num_boxes, void* descriptors, size_t descriptor_nbytes,
                           int device, void* stream);

// Runs a phase table of an in-place relayout (../ordered_phases.h, validated by the caller) on buf_bases[l] with
// scratch scratch_bases[l] for every layer: one launch per phase, all descriptors in one upload. Same device,
// stream and descriptor rules as copy_boxes_bases_cuda (descriptor size: cuda_descriptor_bytes(rows, phases,
// layers)). The buffers and scratch slices must be pairwise disjoint.
void copy_phases_cuda(const uint64_t* buf_bases, const uint64_t* scratch_bases, int64_t num_layers,
                      const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                      void* descriptors, size_t descriptor_nbytes, int device, void* stream);

// Number of visible CUDA devices; 0 when there is no driver or device. Never throws.
int cuda_device_count() noexcept;

}  // namespace amoeba
