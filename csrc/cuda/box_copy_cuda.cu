// CUDA byte engine: a whole batch of boxes (see ../box_copy.h) in ONE kernel launch, optionally applied to many
// buffer pairs (layers) at once, and in-place relayouts as a few such launches.
//
// Design
//  * The host canonicalises each box (drops count-1 levels, merges levels that are contiguous on both sides, folds
//    a level into the run when runs are back to back) so that e.g. a dense 3-level box becomes one long run.
//  * Each box is cut into "work units" of about kTileBytes bytes: a long run is split into equal tiles
//    (tiled unit), while short runs are grouped, kTileBytes / run_bytes runs per unit (grouped unit). A host
//    prefix sum over units (unit_start) lets any block find the box of a unit by binary search.
//  * Layers: the same boxes are applied to L (dst, src) base pairs read from two device tables; the unit space is
//    L x (units of one layer), layer-major, so one launch covers every layer and a block's range of units
//    crosses from one layer to the next without another search.
//  * Descriptors (base tables, prefix sums, boxes) live in a device buffer the CALLER allocates (the Python side
//    uses a torch uint8 tensor: the caching allocator owns it and reuses it in stream order). The host writes them
//    into a pinned staging buffer (one small pool per device, reused and grown, an event per buffer so a buffer is
//    rewritten only after its previous upload finished) and uploads them with one cudaMemcpyAsync on the caller's
//    stream. Nothing here allocates device memory or synchronises the stream.
//  * Every entry point makes the buffers' device current for the call and restores the caller's device.
//  * Every block of the (one wave) grid takes a contiguous range of units: one binary search per block, then it
//    walks the boxes forward. All threads of a block work on the same unit, so control flow is block-uniform.
//  * Word width per box: grouped units use the widest word (16/8/4/2/1 bytes) that divides every run start on
//    both sides, in every layer, and the run length; tiled units use the widest word for which source and
//    destination have the same phase in every layer and copy the misaligned head and the tail byte by byte, so odd
//    offsets of 1-byte dtypes still get 16-byte accesses in the body of long runs.
//  * In-place relayout: ../ordered_phases.cpp plans the ordered runs as phases that are each safe as one parallel
//    copy (direct buf -> buf, or a gather into scratch followed by a scatter back); each phase is one launch of the
//    same kernel, all phases' descriptors in one upload.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../box_copy.h"
#include "../ordered_phases.h"
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

// unit_start: num_boxes + 1 strictly increasing entries, unit_start[num_boxes] = units of one layer.
// dst_bases, src_bases: num_layers buffer addresses each; layer l copies from src_bases[l] to dst_bases[l].
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) copy_boxes_kernel(
    const uint64_t* __restrict__ dst_bases, const uint64_t* __restrict__ src_bases, int64_t num_layers,
    const DevBox* __restrict__ boxes, const int64_t* __restrict__ unit_start, int64_t num_boxes,
    int64_t units_per_block) {
  const int64_t layer_units = unit_start[num_boxes];
  const int64_t total_units = layer_units * num_layers;
  int64_t u = int64_t(blockIdx.x) * units_per_block;
  const int64_t u_end = min(total_units, u + units_per_block);
  if (u >= u_end) return;
  int64_t layer = u / layer_units;  // the only 64-bit division of the block
  int64_t local = u - layer * layer_units;
  // Last box whose first unit is <= local.
  int64_t lo = 0, hi = num_boxes - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (unit_start[mid] <= local) lo = mid; else hi = mid - 1;
  }
  int64_t bi = lo;
  uint8_t* dst = reinterpret_cast<uint8_t*>(dst_bases[layer]);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(src_bases[layer]);
  for (; u < u_end; ++u, ++local) {
    if (local == layer_units) {  // the block's range continues in the next layer: same boxes, next bases
      ++layer;
      local = 0;
      bi = 0;
      dst = reinterpret_cast<uint8_t*>(dst_bases[layer]);
      src = reinterpret_cast<const uint8_t*>(src_bases[layer]);
    }
    while (unit_start[bi + 1] <= local) ++bi;
    const DevBox& b = boxes[bi];
    const int64_t in_box = local - unit_start[bi];
    switch (b.width) {
      case 16: copy_unit_as<uint4>(dst, src, b, in_box); break;
      case 8: copy_unit_as<uint2>(dst, src, b, in_box); break;
      case 4: copy_unit_as<uint32_t>(dst, src, b, in_box); break;
      case 2: copy_unit_as<uint16_t>(dst, src, b, in_box); break;
      default: copy_unit_as<uint8_t>(dst, src, b, in_box); break;
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

// What the word-width choice needs to know about the bases of all layers: the first layer's bases and the bits in
// which any layer differs from the first (OR of the differences). A word width w divides (base_l + offset) for
// every l exactly when it divides base_0 + offset and every base_l - base_0, i.e. the OR of those differences.
struct BaseAlignment {
  int64_t src0 = 0, dst0 = 0;
  uint64_t src_spread = 0, dst_spread = 0;
  uint64_t phase_spread = 0;  // OR over l of (src_l - dst_l) - (src_0 - dst_0)
};

BaseAlignment base_alignment(const uint64_t* dst_bases, const uint64_t* src_bases, int64_t num_layers) {
  BaseAlignment a;
  a.src0 = int64_t(src_bases[0]);
  a.dst0 = int64_t(dst_bases[0]);
  for (int64_t l = 1; l < num_layers; ++l) {
    a.src_spread |= src_bases[l] - src_bases[0];
    a.dst_spread |= dst_bases[l] - dst_bases[0];
    a.phase_spread |= (src_bases[l] - dst_bases[l]) - (src_bases[0] - dst_bases[0]);
  }
  return a;
}

// Builds the canonical descriptor of a box; returns its number of units per layer (0: nothing to copy, skip it).
int64_t make_dev_box(const Box& in, const BaseAlignment& bases, DevBox* out) {
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

  const int64_t src0 = bases.src0 + in.src_offset, dst0 = bases.dst0 + in.dst_offset;
  // Grouped units need every run start aligned on both sides (in every layer) and whole words per run.
  const int64_t clean[11] = {src0, dst0, run, lv[0].s, lv[0].d, lv[1].s, lv[1].d, lv[2].s, lv[2].d,
                             int64_t(bases.src_spread), int64_t(bases.dst_spread)};
  const int w_clean = widest_word(clean, 11);
  // Tiled units only need both sides to share the phase (in every layer); the head and tail are copied bytewise.
  const int64_t phase[5] = {src0 - dst0, lv[0].s - lv[0].d, lv[1].s - lv[1].d, lv[2].s - lv[2].d,
                            int64_t(bases.phase_spread)};
  const int w_phase = widest_word(phase, 5);

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

// Makes `device` current for the duration of a call (the caller's thread may have another device current) and
// restores the caller's device. device < 0 keeps the current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    AMOEBA_CUDA_CHECK(cudaGetDevice(&previous_));
    device_ = device < 0 ? previous_ : device;
    if (device_ != previous_) {
      AMOEBA_CUDA_CHECK(cudaSetDevice(device_));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int previous_ = 0, device_ = 0;
  bool switched_ = false;
};

// SM count and resident blocks per SM of the kernel, cached per device (the queries cost more than a launch).
struct LaunchShape {
  int sms = 0, blocks_per_sm = 0;
};

LaunchShape launch_shape(int device) {
  static std::mutex mu;
  static std::map<int, LaunchShape> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(device);
    if (it != cache.end()) return it->second;
  }
  LaunchShape shape;
  AMOEBA_CUDA_CHECK(cudaDeviceGetAttribute(&shape.sms, cudaDevAttrMultiProcessorCount, device));
  AMOEBA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&shape.blocks_per_sm, copy_boxes_kernel, kThreads,
                                                                  0));
  shape.sms = std::max(shape.sms, 1);
  shape.blocks_per_sm = std::max(shape.blocks_per_sm, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[device] = shape;
  return shape;
}

// Pinned host buffers the descriptors are written into and uploaded from, a few per device, reused across calls
// and grown (doubling) when a call needs more. A buffer is handed out only when the event recorded after its last
// upload has completed, so an upload still in flight is never overwritten; when every buffer of the device is busy
// a new one is made (up to kMaxBuffersPerDevice, then the call waits for the oldest upload: a wait for one earlier
// host-to-device copy to run, so a host that queues more than that many copies ahead of a busy stream waits). Growing frees a pinned buffer (cudaFreeHost may synchronise the
// device; it happens O(log size) times per process). Kept for the life of the process (never freed at exit, when
// the CUDA runtime may already be torn down).
class PinnedStaging {
 public:
  struct Buffer {
    void* host = nullptr;
    size_t capacity = 0;
    cudaEvent_t uploaded = nullptr;  // recorded on the caller's stream after the last upload from this buffer
    bool recorded = false;
    bool in_use = false;  // leased to a call (filled, uploading)
    uint64_t last_use = 0;
  };

  static constexpr size_t kMaxBuffersPerDevice = 32;
  static constexpr size_t kMinCapacity = size_t(64) << 10;

  // A buffer of at least `bytes` for `device` (which must be current), free to overwrite.
  Buffer* acquire(int device, size_t bytes) {
    Buffer* pick = nullptr;
    bool wait_for_upload = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<std::unique_ptr<Buffer>>& list = buffers_[device];
      Buffer *free_small = nullptr, *oldest_busy = nullptr;
      for (const auto& b : list) {
        if (b->in_use) continue;
        if (!upload_finished(*b)) {
          if (oldest_busy == nullptr || b->last_use < oldest_busy->last_use) oldest_busy = b.get();
          continue;
        }
        if (b->capacity >= bytes) {
          pick = b.get();
          break;
        }
        if (free_small == nullptr) free_small = b.get();
      }
      if (pick == nullptr) pick = free_small;
      if (pick == nullptr && (list.size() < kMaxBuffersPerDevice || oldest_busy == nullptr)) {
        list.push_back(std::make_unique<Buffer>());
        pick = list.back().get();
      }
      if (pick == nullptr) {
        pick = oldest_busy;
        wait_for_upload = true;
      }
      pick->in_use = true;
      pick->last_use = ++uses_;
    }
    try {  // outside the lock: these calls may take a while
      if (pick->uploaded == nullptr)
        AMOEBA_CUDA_CHECK(cudaEventCreateWithFlags(&pick->uploaded, cudaEventDisableTiming));
      if (wait_for_upload) AMOEBA_CUDA_CHECK(cudaEventSynchronize(pick->uploaded));
      if (pick->capacity < bytes) grow(pick, bytes);
    } catch (...) {
      release(pick);
      throw;
    }
    return pick;
  }

  void release(Buffer* b) {
    std::lock_guard<std::mutex> lock(mu_);
    b->in_use = false;
  }

 private:
  static bool upload_finished(const Buffer& b) {
    if (!b.recorded) return true;
    const cudaError_t err = cudaEventQuery(b.uploaded);
    if (err == cudaSuccess) return true;
    (void)cudaGetLastError();  // cudaErrorNotReady (or a real error: then the buffer is left alone)
    return false;
  }

  static void grow(Buffer* b, size_t bytes) {
    if (b->host != nullptr) {
      b->capacity = 0;
      void* old = b->host;
      b->host = nullptr;
      AMOEBA_CUDA_CHECK(cudaFreeHost(old));
    }
    const size_t capacity = std::max({bytes, 2 * b->capacity, kMinCapacity});
    AMOEBA_CUDA_CHECK(cudaHostAlloc(&b->host, capacity, cudaHostAllocPortable));
    b->capacity = capacity;
  }

  std::mutex mu_;
  std::map<int, std::vector<std::unique_ptr<Buffer>>> buffers_;
  uint64_t uses_ = 0;
};

PinnedStaging& pinned_staging() {
  static PinnedStaging* staging = new PinnedStaging();  // leaked on purpose, see above
  return *staging;
}

// A pinned buffer leased for one call. upload() enqueues the copy and records the buffer's event; if a call fails
// after enqueueing the copy but before recording the event, the lease waits for the stream before it gives the
// buffer back, so the buffer is never rewritten under a pending copy.
class StagingLease {
 public:
  StagingLease(int device, size_t bytes) : buf_(pinned_staging().acquire(device, bytes)) {}
  ~StagingLease() {
    if (pending_ != nullptr && cudaStreamSynchronize(pending_) != cudaSuccess) (void)cudaGetLastError();
    pinned_staging().release(buf_);
  }
  StagingLease(const StagingLease&) = delete;
  StagingLease& operator=(const StagingLease&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(buf_->host); }

  void upload(void* device_dst, size_t bytes, cudaStream_t stream) {
    pending_ = stream;
    AMOEBA_CUDA_CHECK(cudaMemcpyAsync(device_dst, buf_->host, bytes, cudaMemcpyHostToDevice, stream));
    AMOEBA_CUDA_CHECK(cudaEventRecord(buf_->uploaded, stream));
    buf_->recorded = true;
    pending_ = nullptr;
  }

 private:
  PinnedStaging::Buffer* buf_;
  cudaStream_t pending_ = nullptr;
};

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// One kernel launch of a call: rows (validated boxes) copied between the layers' bases of two tables.
struct Launch {
  const int64_t* rows;
  int64_t num_rows;
  int dst_table, src_table;  // 0 or 1
};

// Byte layout of one descriptor upload:
//   [table 0: num_layers uint64 | table 1: num_layers uint64] (padded to 16)
//   per launch: [unit_start: num_rows + 1 int64 (padded to 16) | DevBox x num_rows]
// Rows that copy nothing leave their DevBox slots unused; the layout depends only on the row counts.
size_t starts_bytes(int64_t num_rows) { return align16(size_t(num_rows + 1) * sizeof(int64_t)); }
size_t tables_bytes(int64_t num_layers) { return align16(size_t(2 * num_layers) * sizeof(uint64_t)); }

size_t layout_bytes(const std::vector<Launch>& launches, int64_t num_layers, std::vector<size_t>* offsets) {
  size_t off = tables_bytes(num_layers);
  for (const Launch& l : launches) {
    if (offsets != nullptr) offsets->push_back(off);
    off += starts_bytes(l.num_rows) + size_t(l.num_rows) * sizeof(DevBox);
  }
  return off;
}

void run_launches(const uint64_t* table0, const uint64_t* table1, int64_t num_layers,
                  const std::vector<Launch>& launches, void* descriptors, size_t descriptor_nbytes, int device,
                  cudaStream_t stream) {
  std::vector<size_t> offsets;
  const size_t needed = layout_bytes(launches, num_layers, &offsets);
  if (descriptors == nullptr || needed > descriptor_nbytes) {
    throw std::invalid_argument("amoeba CUDA engine: the descriptor buffer holds " +
                                std::to_string(descriptor_nbytes) + " bytes, the call needs " +
                                std::to_string(needed) + " (see cuda_descriptor_bytes)");
  }
  DeviceGuard guard(device);
  const LaunchShape shape = launch_shape(guard.device());
  StagingLease staging(guard.device(), needed);
  uint8_t* host = staging.data();
  const uint64_t* tables[2] = {table0, table1};
  std::memcpy(host, table0, size_t(num_layers) * sizeof(uint64_t));
  std::memcpy(host + size_t(num_layers) * sizeof(uint64_t), table1, size_t(num_layers) * sizeof(uint64_t));
  std::vector<int64_t> kept(launches.size()), layer_units(launches.size());
  for (size_t i = 0; i < launches.size(); ++i) {
    const Launch& l = launches[i];
    int64_t* unit_start = reinterpret_cast<int64_t*>(host + offsets[i]);
    DevBox* boxes = reinterpret_cast<DevBox*>(host + offsets[i] + starts_bytes(l.num_rows));
    const BaseAlignment bases = base_alignment(tables[l.dst_table], tables[l.src_table], num_layers);
    int64_t k = 0;
    unit_start[0] = 0;
    for (int64_t r = 0; r < l.num_rows; ++r) {
      DevBox b;
      const int64_t units = make_dev_box(box_from_row(l.rows + r * kBoxFields), bases, &b);
      if (units == 0) continue;
      boxes[k] = b;
      unit_start[k + 1] = unit_start[k] + units;
      ++k;
    }
    kept[i] = k;
    layer_units[i] = unit_start[k];
  }

  (void)cudaGetLastError();  // drop a stale non-sticky error so the launch checks below report these launches
  staging.upload(descriptors, needed, stream);
  uint8_t* dev = static_cast<uint8_t*>(descriptors);
  const uint64_t* dev_tables[2] = {reinterpret_cast<const uint64_t*>(dev),
                                   reinterpret_cast<const uint64_t*>(dev) + num_layers};
  const int64_t max_blocks = int64_t(shape.sms) * shape.blocks_per_sm;
  for (size_t i = 0; i < launches.size(); ++i) {
    if (layer_units[i] == 0) continue;
    // One resident wave; each block takes an equal contiguous range of units (over all layers).
    const int64_t total_units = layer_units[i] * num_layers;
    const int64_t blocks = std::min(total_units, max_blocks);
    const int64_t units_per_block = (total_units + blocks - 1) / blocks;
    const int64_t* d_starts = reinterpret_cast<const int64_t*>(dev + offsets[i]);
    const DevBox* d_boxes = reinterpret_cast<const DevBox*>(dev + offsets[i] + starts_bytes(launches[i].num_rows));
    copy_boxes_kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream>>>(
        dev_tables[launches[i].dst_table], dev_tables[launches[i].src_table], num_layers, d_boxes, d_starts,
        kept[i], units_per_block);
    AMOEBA_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

size_t cuda_descriptor_bytes(int64_t num_rows, int64_t num_launches, int64_t num_layers) {
  // Each launch's unit_start pads (n + 1) int64 to 16 bytes: at most 8 n + 16 bytes.
  return tables_bytes(num_layers) + size_t(num_rows) * (sizeof(int64_t) + sizeof(DevBox)) +
         size_t(num_launches) * 16;
}

void copy_boxes_bases_cuda(const uint64_t* dst_bases, const uint64_t* src_bases, int64_t num_layers,
                           const int64_t* rows, int64_t num_boxes, void* descriptors, size_t descriptor_nbytes,
                           int device, void* stream) {
  if (num_layers <= 0 || num_boxes <= 0) return;
  run_launches(dst_bases, src_bases, num_layers, {Launch{rows, num_boxes, 0, 1}}, descriptors, descriptor_nbytes,
               device, static_cast<cudaStream_t>(stream));
}

void copy_phases_cuda(const uint64_t* buf_bases, const uint64_t* scratch_bases, int64_t num_layers,
                      const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                      void* descriptors, size_t descriptor_nbytes, int device, void* stream) {
  if (num_layers <= 0 || num_phases <= 0) return;
  std::vector<Launch> launches;
  launches.reserve(static_cast<size_t>(num_phases));
  for (int64_t p = 0; p < num_phases; ++p) {
    // Table 0 holds the buffers, table 1 the scratch slices.
    const int dst_table = kinds[p] == kPhaseGather ? 1 : 0;
    const int src_table = kinds[p] == kPhaseScatter ? 1 : 0;
    launches.push_back(Launch{rows + starts[p] * kBoxFields, starts[p + 1] - starts[p], dst_table, src_table});
  }
  run_launches(buf_bases, scratch_bases, num_layers, launches, descriptors, descriptor_nbytes, device,
               static_cast<cudaStream_t>(stream));
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
