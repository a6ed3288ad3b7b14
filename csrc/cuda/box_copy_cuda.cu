// CUDA byte engine: a whole batch of boxes (see ../box_copy.h) in ONE kernel launch.
//
// Design
//  * The host canonicalises each box (drops count-1 levels, merges levels that are contiguous on both sides, folds
//    a level into the run when runs are back to back) so that e.g. a dense 3-level box becomes one long run.
//  * Each box is cut into "work units" of about kTileBytes bytes: a long run is split into equal tiles
//    (tiled unit), while short runs are grouped, kTileBytes / run_bytes runs per unit (grouped unit). A host
//    prefix sum over units (unit_start) lets any block find the box of a unit by binary search.
//  * Descriptors and the prefix sum travel in one stream-ordered cudaMemcpyAsync into one cudaMallocAsync buffer
//    that is released with cudaFreeAsync after the launch, so nothing here synchronises the stream.
//  * Every block of the (one wave) grid takes a contiguous range of units: one binary search per block, then it
//    walks the boxes forward. All threads of a block work on the same unit, so control flow is block-uniform.
//  * Word width per box: grouped units use the widest word (16/8/4/2/1 bytes) that divides every run start on
//    both sides and the run length; tiled units use the widest word for which source and destination have the
//    same phase and copy the misaligned head and the tail byte by byte, so odd offsets of 1-byte dtypes still
//    get 16-byte accesses in the body of long runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "../box_copy.h"
#include "box_copy_cuda.h"

namespace amoeba {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent loads in flight per thread before the stores
// Unconstrained, the kernel takes ~118 registers (512 resident threads per SM). Three blocks (80 registers; ptxas
// then spills a few bytes of per-unit state) keep 768 threads x 4 x 16 B = 48 KiB of loads in flight per SM, above
// what HBM3 needs to stay saturated. Four blocks (64 registers) spill more; tune on hardware.
constexpr int kMinBlocksPerSm = 3;
// 256 threads x 4 x 16 B: one pass of the unrolled loop over 16-byte words.
constexpr int64_t kTileBytes = int64_t(kThreads) * kUnroll * 16;
// Below this, a misaligned short run is cheaper to copy with narrow words in a grouped unit than to spend a
// whole block on it as a tiled unit.
constexpr int64_t kNarrowGroupMaxRun = 512;

void check(cudaError_t err, const char* call) {
  if (err != cudaSuccess) {
    // Clear a non-sticky error so that it does not resurface from the next cudaGetLastError.
    (void)cudaGetLastError();
    throw CudaError(std::string("amoeba CUDA engine: ") + call + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")");
  }
}
#define AMOEBA_CUDA_CHECK(call) check((call), #call)

// A canonical box as the kernel sees it. 16-byte aligned so the array can be loaded cheaply.
struct alignas(16) DevBox {
  int64_t src_off, dst_off;  // offsets of run 0 from the buffer bases
  int64_t run_bytes;
  int64_t count0, count1;  // count2 = num_runs / (count0 * count1)
  int64_t num_runs;
  int64_t src_stride[3], dst_stride[3];
  int64_t per_unit;    // grouped: runs per unit; tiled: tiles per run
  int32_t tile_bytes;  // tiled: bytes per tile (multiple of 16); 0 marks a grouped box
  int32_t width;       // word size in bytes: 1, 2, 4, 8 or 16
};

// ---------------------------------------------------------------------------------------------------------------
// Device side

// 64-bit division is a long software sequence on the GPU; almost every operand fits in 32 bits.
__device__ __forceinline__ uint64_t udiv(uint64_t a, uint64_t b) {
  if (((a | b) >> 32) == 0) return uint32_t(a) / uint32_t(b);
  return a / b;
}

__device__ __forceinline__ void run_offsets(const DevBox& b, int64_t run, int64_t* so, int64_t* dof) {
  const int64_t q0 = udiv(run, b.count0);
  const int64_t i0 = run - q0 * b.count0;
  const int64_t i2 = udiv(q0, b.count1);
  const int64_t i1 = q0 - i2 * b.count1;
  *so = b.src_off + i0 * b.src_stride[0] + i1 * b.src_stride[1] + i2 * b.src_stride[2];
  *dof = b.dst_off + i0 * b.dst_stride[0] + i1 * b.dst_stride[1] + i2 * b.dst_stride[2];
}

// Block-cooperative copy of one contiguous range whose two ends share the same phase modulo sizeof(T).
template <typename T>
__device__ __forceinline__ void copy_range(uint8_t* d, const uint8_t* s, int n) {
  constexpr int W = sizeof(T);
  const int t = threadIdx.x;
  const int head = min(n, int((W - (reinterpret_cast<uintptr_t>(s) & (W - 1))) & (W - 1)));
  if (t < head) d[t] = s[t];
  const int words = (n - head) / W;
  const T* sw = reinterpret_cast<const T*>(s + head);
  T* dw = reinterpret_cast<T*>(d + head);
  int i = t;
  for (; i + (kUnroll - 1) * kThreads < words; i += kUnroll * kThreads) {
    T v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = sw[i + k * kThreads];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) dw[i + k * kThreads] = v[k];
  }
  for (; i < words; i += kThreads) dw[i] = sw[i];
  const int tail_start = head + words * W;
  if (t < n - tail_start) d[tail_start + t] = s[tail_start + t];
}

// Block-cooperative copy of runs [r0, r0 + n_runs) of a grouped box: a flat (run, word) index space so that short
// runs (e.g. 256-byte head ranges) keep every thread busy. The host keeps count0 * count1 of grouped boxes below
// 2^31, so the level walk runs in 32-bit arithmetic (64-bit division is a long software sequence on the GPU, and
// registers decide occupancy here).
template <typename T>
__device__ __forceinline__ void copy_grouped(uint8_t* dst, const uint8_t* src, const DevBox& b, int64_t r0,
                                             int n_runs) {
  constexpr int W = sizeof(T);
  const unsigned words_per_run = unsigned(b.run_bytes / W);
  const int total = n_runs * int(words_per_run);
  const unsigned count0 = unsigned(b.count0), count1 = unsigned(b.count1);
  // Level indices of the unit's first run; the runs after it are reached incrementally.
  const int64_t q0 = udiv(r0, count0);
  const unsigned i0b = unsigned(r0 - q0 * count0);
  const int64_t i2b = udiv(q0, count1);
  const unsigned i1b = unsigned(q0 - i2b * count1);
  const uint8_t* s_base = src + b.src_off + i2b * b.src_stride[2];
  uint8_t* d_base = dst + b.dst_off + i2b * b.dst_stride[2];
  for (int base = threadIdx.x; base < total; base += kUnroll * kThreads) {
    T v[kUnroll];
    T* dp[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int e = base + k * kThreads;
      dp[k] = nullptr;
      if (e < total) {
        const unsigned rr = unsigned(e) / words_per_run;
        const unsigned word = unsigned(e) - rr * words_per_run;
        unsigned i0 = i0b + rr, i1 = i1b, i2 = 0;  // i0b < 2^31 and rr < 2^14: no wrap-around
        if (i0 >= count0) {
          const unsigned q = i0 / count0;
          i0 -= q * count0;
          i1 += q;
          if (i1 >= count1) {
            i2 = i1 / count1;
            i1 -= i2 * count1;
          }
        }
        const T* sp = reinterpret_cast<const T*>(s_base + i0 * b.src_stride[0] + i1 * b.src_stride[1] +
                                                 i2 * b.src_stride[2]) + word;
        dp[k] = reinterpret_cast<T*>(d_base + i0 * b.dst_stride[0] + i1 * b.dst_stride[1] + i2 * b.dst_stride[2]) +
                word;
        v[k] = *sp;
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (dp[k]) *dp[k] = v[k];
  }
}

template <typename T>
__device__ __forceinline__ void copy_unit_as(uint8_t* dst, const uint8_t* src, const DevBox& b, int64_t local) {
  if (b.tile_bytes == 0) {
    const int64_t r0 = local * b.per_unit;
    copy_grouped<T>(dst, src, b, r0, int(min(b.per_unit, b.num_runs - r0)));
  } else {
    const int64_t run = udiv(local, b.per_unit);
    const int64_t start = (local - run * b.per_unit) * b.tile_bytes;
    int64_t so, dof;
    run_offsets(b, run, &so, &dof);
    copy_range<T>(dst + dof + start, src + so + start, int(min(int64_t(b.tile_bytes), b.run_bytes - start)));
  }
}

// unit_start: num_boxes + 1 strictly increasing entries, unit_start[num_boxes] = total units.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) copy_boxes_kernel(uint8_t* dst, const uint8_t* src,
                                                              const DevBox* __restrict__ boxes,
                                                              const int64_t* __restrict__ unit_start,
                                                              int64_t num_boxes, int64_t units_per_block) {
  const int64_t total_units = unit_start[num_boxes];
  int64_t u = int64_t(blockIdx.x) * units_per_block;
  const int64_t u_end = min(total_units, u + units_per_block);
  if (u >= u_end) return;
  // Last box whose first unit is <= u.
  int64_t lo = 0, hi = num_boxes - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (unit_start[mid] <= u) lo = mid; else hi = mid - 1;
  }
  int64_t bi = lo;
  for (; u < u_end; ++u) {
    while (unit_start[bi + 1] <= u) ++bi;
    const DevBox& b = boxes[bi];
    const int64_t local = u - unit_start[bi];
    switch (b.width) {
      case 16: copy_unit_as<uint4>(dst, src, b, local); break;
      case 8: copy_unit_as<uint2>(dst, src, b, local); break;
      case 4: copy_unit_as<uint32_t>(dst, src, b, local); break;
      case 2: copy_unit_as<uint16_t>(dst, src, b, local); break;
      default: copy_unit_as<uint8_t>(dst, src, b, local); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

// Widest word (<= 16 bytes) dividing every value.
int widest_word(const int64_t* values, int n) {
  int w = 16;
  for (int i = 0; i < n; ++i)
    while (w > 1 && (uint64_t(values[i]) & uint64_t(w - 1)) != 0) w /= 2;
  return w;
}

// Builds the canonical descriptor of a box; returns its number of units (0: nothing to copy, skip the box).
int64_t make_dev_box(const Box& in, uintptr_t dst_base, uintptr_t src_base, DevBox* out) {
  if (in.run_bytes == 0) return 0;
  struct Level { int64_t count, s, d; };
  Level lv[3];
  int nl = 0;
  for (int l = 0; l < 3; ++l)
    if (in.count[l] > 1) lv[nl++] = {in.count[l], in.src_stride[l], in.dst_stride[l]};
  int64_t run = in.run_bytes;
  for (bool changed = true; changed;) {
    changed = false;
    if (nl > 0 && lv[0].s == run && lv[0].d == run) {  // back-to-back runs on both sides: one longer run
      run *= lv[0].count;
      for (int l = 1; l < nl; ++l) lv[l - 1] = lv[l];
      --nl;
      changed = true;
      continue;
    }
    for (int l = 0; l + 1 < nl; ++l) {
      if (lv[l + 1].s == lv[l].count * lv[l].s && lv[l + 1].d == lv[l].count * lv[l].d) {
        lv[l].count *= lv[l + 1].count;
        for (int k = l + 2; k < nl; ++k) lv[k - 1] = lv[k];
        --nl;
        changed = true;
        break;
      }
    }
  }
  for (int l = nl; l < 3; ++l) lv[l] = {1, 0, 0};

  DevBox& b = *out;
  std::memset(&b, 0, sizeof(b));
  b.src_off = in.src_offset;
  b.dst_off = in.dst_offset;
  b.run_bytes = run;
  b.count0 = lv[0].count;
  b.count1 = lv[1].count;
  b.num_runs = lv[0].count * lv[1].count * lv[2].count;
  for (int l = 0; l < 3; ++l) {
    b.src_stride[l] = lv[l].s;
    b.dst_stride[l] = lv[l].d;
  }

  const int64_t src0 = int64_t(src_base) + in.src_offset, dst0 = int64_t(dst_base) + in.dst_offset;
  // Grouped units need every run start aligned on both sides and whole words per run.
  const int64_t clean[9] = {src0, dst0, run, lv[0].s, lv[0].d, lv[1].s, lv[1].d, lv[2].s, lv[2].d};
  const int w_clean = widest_word(clean, 9);
  // Tiled units only need both sides to share the phase; the head and tail are copied bytewise.
  const int64_t phase[4] = {src0 - dst0, lv[0].s - lv[0].d, lv[1].s - lv[1].d, lv[2].s - lv[2].d};
  const int w_phase = widest_word(phase, 4);

  const bool small_counts = lv[0].count * lv[1].count < (int64_t(1) << 31);
  if (small_counts && 2 * run <= kTileBytes && (w_clean == w_phase || run <= kNarrowGroupMaxRun)) {
    b.per_unit = std::min(kTileBytes / run, b.num_runs);
    b.tile_bytes = 0;
    b.width = w_clean;
    return (b.num_runs + b.per_unit - 1) / b.per_unit;
  }
  // Equal tiles (multiples of 16 bytes, so every tile keeps the run's phase) avoid a tiny last tile.
  int64_t tiles = (run + kTileBytes - 1) / kTileBytes;
  const int64_t tile = ((run + tiles - 1) / tiles + 15) / 16 * 16;
  tiles = (run + tile - 1) / tile;
  b.per_unit = tiles;
  b.tile_bytes = int32_t(tile);
  b.width = w_phase;
  return b.num_runs * tiles;
}

// Frees the stream-ordered descriptor buffer on every path, including exceptions after the allocation.
struct StreamBuffer {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ~StreamBuffer() {
    if (ptr != nullptr && cudaFreeAsync(ptr, stream) != cudaSuccess) (void)cudaGetLastError();
  }
};

// Resident blocks per SM for the kernel, cached per device (the query costs more than the launch).
int blocks_per_sm(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 = not computed yet
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  AMOEBA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, copy_boxes_kernel, kThreads, 0));
  n = std::max(n, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

void copy_boxes_cuda(uint8_t* dst, const uint8_t* src, const int64_t* rows, int64_t num_boxes, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // Staging layout: [unit_start: kept boxes + 1 int64, padded to 16 bytes][DevBox array].
  std::vector<DevBox> dev_boxes;
  dev_boxes.reserve(static_cast<size_t>(num_boxes));
  std::vector<int64_t> unit_start(1, 0);
  unit_start.reserve(static_cast<size_t>(num_boxes) + 1);
  for (int64_t i = 0; i < num_boxes; ++i) {
    DevBox b;
    const int64_t units =
        make_dev_box(box_from_row(rows + i * kBoxFields), reinterpret_cast<uintptr_t>(dst),
                     reinterpret_cast<uintptr_t>(src), &b);
    if (units == 0) continue;
    dev_boxes.push_back(b);
    unit_start.push_back(unit_start.back() + units);
  }
  if (dev_boxes.empty()) return;
  const int64_t kept = static_cast<int64_t>(dev_boxes.size());
  const int64_t total_units = unit_start.back();
  const size_t starts_bytes = (unit_start.size() * sizeof(int64_t) + 15) / 16 * 16;
  const size_t boxes_bytes = dev_boxes.size() * sizeof(DevBox);
  std::vector<uint8_t> staging(starts_bytes + boxes_bytes);
  std::memcpy(staging.data(), unit_start.data(), unit_start.size() * sizeof(int64_t));
  std::memcpy(staging.data() + starts_bytes, dev_boxes.data(), boxes_bytes);

  (void)cudaGetLastError();  // drop a stale non-sticky error so the launch check below reports this launch
  int device = 0, sms = 0;
  AMOEBA_CUDA_CHECK(cudaGetDevice(&device));
  AMOEBA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int per_sm = blocks_per_sm(device);

  StreamBuffer buf;
  buf.stream = stream;
  AMOEBA_CUDA_CHECK(cudaMallocAsync(&buf.ptr, staging.size(), stream));
  // From pageable memory, cudaMemcpyAsync returns only after the source has been copied to a driver staging
  // buffer, so `staging` may be destroyed when this function returns while the transfer stays stream-ordered.
  AMOEBA_CUDA_CHECK(cudaMemcpyAsync(buf.ptr, staging.data(), staging.size(), cudaMemcpyHostToDevice, stream));

  // One resident wave; each block takes an equal contiguous range of units.
  const int64_t max_blocks = int64_t(sms) * per_sm;
  const int64_t blocks = std::min(total_units, max_blocks);
  const int64_t units_per_block = (total_units + blocks - 1) / blocks;
  const int64_t* d_starts = static_cast<const int64_t*>(buf.ptr);
  const DevBox* d_boxes = reinterpret_cast<const DevBox*>(static_cast<uint8_t*>(buf.ptr) + starts_bytes);
  copy_boxes_kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream>>>(
      dst, src, d_boxes, d_starts, kept, units_per_block);
  AMOEBA_CUDA_CHECK(cudaGetLastError());
  // buf's destructor enqueues cudaFreeAsync after the kernel on the same stream.
}

int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace amoeba
