// Batched strided copies ("boxes") shared by the CPU and CUDA byte engines.
//
// A box copies a contiguous run of `run_bytes` bytes, repeated over up to three nested levels:
//   for i2 < count2, i1 < count1, i0 < count0:
//     dst[dst_offset + i0*dst_stride0 + i1*dst_stride1 + i2*dst_stride2 ...+run_bytes)
//       = src[src_offset + i0*src_stride0 + i1*src_stride1 + i2*src_stride2 ...+run_bytes)
// Unused levels have count 1 (their strides are ignored). Offsets and strides are in bytes and non-negative.
// Python passes boxes as an int64 array of shape (num_boxes, kBoxFields) in the column order of BoxField.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace amoeba {

enum BoxField : int {
  kSrcOffset = 0,
  kDstOffset,
  kRunBytes,
  kCount0,
  kSrcStride0,
  kDstStride0,
  kCount1,
  kSrcStride1,
  kDstStride1,
  kCount2,
  kSrcStride2,
  kDstStride2,
  kBoxFields
};

struct Box {
  int64_t src_offset, dst_offset, run_bytes;
  int64_t count[3];
  int64_t src_stride[3];
  int64_t dst_stride[3];
};

inline Box box_from_row(const int64_t* row) {
  Box b;
  b.src_offset = row[kSrcOffset];
  b.dst_offset = row[kDstOffset];
  b.run_bytes = row[kRunBytes];
  for (int l = 0; l < 3; ++l) {
    b.count[l] = row[kCount0 + 3 * l];
    b.src_stride[l] = row[kSrcStride0 + 3 * l];
    b.dst_stride[l] = row[kDstStride0 + 3 * l];
  }
  return b;
}

inline int64_t box_num_runs(const Box& b) { return b.count[0] * b.count[1] * b.count[2]; }

// Byte offsets (relative to the buffer base) of run number `run` of box `b`, runs ordered with level 0 fastest.
inline void box_run_offsets(const Box& b, int64_t run, int64_t* src_off, int64_t* dst_off) {
  const int64_t i0 = run % b.count[0];
  const int64_t rest = run / b.count[0];
  const int64_t i1 = rest % b.count[1];
  const int64_t i2 = rest / b.count[1];
  *src_off = b.src_offset + i0 * b.src_stride[0] + i1 * b.src_stride[1] + i2 * b.src_stride[2];
  *dst_off = b.dst_offset + i0 * b.dst_stride[0] + i1 * b.dst_stride[1] + i2 * b.dst_stride[2];
}

// One past the last byte a box touches on each side; used for bounds checks.
inline void box_extent(const Box& b, int64_t* src_end, int64_t* dst_end) {
  *src_end = b.src_offset + b.run_bytes;
  *dst_end = b.dst_offset + b.run_bytes;
  for (int l = 0; l < 3; ++l) {
    *src_end += (b.count[l] - 1) * b.src_stride[l];
    *dst_end += (b.count[l] - 1) * b.dst_stride[l];
  }
}

// Validates every box against the buffer sizes; throws std::invalid_argument naming the box and its values.
// Returns the total number of bytes the boxes copy.
int64_t validate_boxes(const int64_t* rows, int64_t num_boxes, int64_t src_nbytes, int64_t dst_nbytes);

// CPU engine. `ordered` copies box by box, run by run, with memmove semantics on one thread (used for in-place
// relayout where destinations may overlap sources read later); otherwise the byte stream is split across the
// threads of the persistent pool (copy_pool.h; num_threads <= 0: default_copy_threads()).
void copy_boxes_cpu(uint8_t* dst, const uint8_t* src, const int64_t* rows, int64_t num_boxes, int num_threads,
                    bool ordered);

// CPU engine over several buffer pairs: applies the same boxes once per pair (dst_bases[p], src_bases[p]),
// p < num_pairs, in one call. Unordered: the whole work (pairs x bytes) is split across the pool, so sources and
// destinations must not overlap. Ordered: each pair gets the run-by-run memmove of copy_boxes_cpu(ordered=true)
// on one thread, pairs in parallel (so the pairs must not overlap one another). Boxes are validated by the caller.
void copy_boxes_bases_cpu(uint8_t* const* dst_bases, const uint8_t* const* src_bases, int64_t num_pairs,
                          const int64_t* rows, int64_t num_boxes, int num_threads, bool ordered);

// In-place relayout (the run-by-run memmoves of copy_boxes_cpu(ordered=true)) of one buffer in private anonymous
// memory, where whole pages move by remapping them instead of copying their bytes: a run at least
// `min_remap_bytes` long that does not overlap its own destination and whose source and destination share their
// offset within a page has its page-aligned middle moved with mremap (page table entries swap places: the
// destination's old pages end up at the source, nothing is freed or zeroed), its head and tail copied. That is exact only when
// no later run reads bytes an earlier run read (disjoint sources: what an in-place compaction is); otherwise, or
// when the kernel refuses, every run is copied. The caller guarantees the buffer is private anonymous memory that
// no other process reads meanwhile. Returns the bytes remapped (the rest was copied). Boxes validated by the caller.
int64_t remap_boxes_ordered_cpu(uint8_t* buf, const int64_t* rows, int64_t num_boxes, int64_t min_remap_bytes);

// Below this many bytes per thread, waking a pool thread costs more than it saves: smaller batches run on the
// calling thread.
constexpr int64_t kMinBytesPerThread = int64_t(1) << 20;

}  // namespace amoeba
