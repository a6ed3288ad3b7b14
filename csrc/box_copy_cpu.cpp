// CPU byte engine: batched strided copies split by bytes across the persistent pool (copy_pool.h).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

#include "box_copy.h"
#include "copy_pool.h"

namespace amoeba {

int64_t validate_boxes(const int64_t* rows, int64_t num_boxes, int64_t src_nbytes, int64_t dst_nbytes) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_boxes; ++i) {
    const Box b = box_from_row(rows + i * kBoxFields);
    bool ok = b.src_offset >= 0 && b.dst_offset >= 0 && b.run_bytes >= 0;
    for (int l = 0; l < 3; ++l) ok = ok && b.count[l] >= 1 && b.src_stride[l] >= 0 && b.dst_stride[l] >= 0;
    int64_t src_end = 0, dst_end = 0;
    if (ok) box_extent(b, &src_end, &dst_end);
    if (!ok || src_end > src_nbytes || dst_end > dst_nbytes) {
      std::ostringstream msg;
      msg << "box " << i << " (src_offset=" << b.src_offset << ", dst_offset=" << b.dst_offset
          << ", run_bytes=" << b.run_bytes;
      for (int l = 0; l < 3; ++l)
        msg << ", level" << l << "=(count=" << b.count[l] << ", src_stride=" << b.src_stride[l]
            << ", dst_stride=" << b.dst_stride[l] << ")";
      if (!ok)
        msg << ") has a negative offset, size or stride, or a count below 1";
      else
        msg << ") reaches src byte " << src_end << " of " << src_nbytes << " and dst byte " << dst_end << " of "
            << dst_nbytes;
      throw std::invalid_argument(msg.str());
    }
    total += b.run_bytes * box_num_runs(b);
  }
  return total;
}

namespace {

// The logical byte stream of a batch: every run of every box, in box order, level 0 fastest.
struct BoxStream {
  std::vector<Box> boxes;
  std::vector<int64_t> box_start;  // box_start[i]: stream offset of box i's first byte; back() = total

  BoxStream(const int64_t* rows, int64_t num_boxes) : box_start(1, 0) {
    boxes.reserve(static_cast<size_t>(num_boxes));
    box_start.reserve(static_cast<size_t>(num_boxes) + 1);
    for (int64_t i = 0; i < num_boxes; ++i) {
      boxes.push_back(box_from_row(rows + i * kBoxFields));
      box_start.push_back(box_start.back() + boxes.back().run_bytes * box_num_runs(boxes.back()));
    }
  }
  int64_t total() const { return box_start.back(); }
};

// Copies the bytes [begin, end) of the stream between one pair of buffers.
void copy_stream_range(uint8_t* dst, const uint8_t* src, const BoxStream& stream, int64_t begin, int64_t end) {
  const std::vector<Box>& boxes = stream.boxes;
  const std::vector<int64_t>& box_start = stream.box_start;
  // First box whose stream range contains `begin`.
  size_t bi = std::upper_bound(box_start.begin(), box_start.end(), begin) - box_start.begin() - 1;
  int64_t pos = begin;
  while (pos < end && bi < boxes.size()) {
    const Box& b = boxes[bi];
    if (b.run_bytes == 0) { ++bi; continue; }
    const int64_t box_end = box_start[bi + 1];
    int64_t run = (pos - box_start[bi]) / b.run_bytes;
    int64_t in_run = (pos - box_start[bi]) % b.run_bytes;
    while (pos < end && pos < box_end) {
      int64_t s, d;
      box_run_offsets(b, run, &s, &d);
      const int64_t n = std::min(b.run_bytes - in_run, end - pos);
      std::memcpy(dst + d + in_run, src + s + in_run, static_cast<size_t>(n));
      pos += n;
      in_run = 0;
      ++run;
    }
    ++bi;
  }
}

// Run-by-run memmove of the whole stream inside one pair (the ordered semantics).
void copy_stream_ordered(uint8_t* dst, const uint8_t* src, const BoxStream& stream) {
  for (const Box& b : stream.boxes) {
    const int64_t runs = box_num_runs(b);
    for (int64_t r = 0; r < runs; ++r) {
      int64_t s, d;
      box_run_offsets(b, r, &s, &d);
      std::memmove(dst + d, src + s, static_cast<size_t>(b.run_bytes));
    }
  }
}

int threads_for(int64_t bytes, int num_threads) {
  if (num_threads <= 0) num_threads = default_copy_threads();
  return static_cast<int>(std::min<int64_t>(num_threads, std::max<int64_t>(1, bytes / kMinBytesPerThread)));
}

}  // namespace

void copy_boxes_bases_cpu(uint8_t* const* dst_bases, const uint8_t* const* src_bases, int64_t num_pairs,
                          const int64_t* rows, int64_t num_boxes, int num_threads, bool ordered) {
  if (num_pairs <= 0 || num_boxes <= 0) return;
  const BoxStream stream(rows, num_boxes);
  const int64_t per_pair = stream.total();
  if (per_pair == 0) return;
  const int threads = threads_for(per_pair * num_pairs, num_threads);
  if (ordered) {
    // Pairs are independent buffers; inside a pair the order is kept by one thread.
    parallel_for_parts(threads, num_pairs, [&](int64_t p) { copy_stream_ordered(dst_bases[p], src_bases[p], stream); });
    return;
  }
  // The work is the concatenation of the stream over all pairs, cut into equal byte ranges. A few parts per thread
  // let a thread that was descheduled (ranks share cores) be covered by the others.
  const int64_t total = per_pair * num_pairs;
  // (threads_for leaves every thread at least kMinBytesPerThread, so a part is at least a quarter of that.)
  const int64_t parts = threads <= 1 ? 1 : int64_t(4) * threads;
  const int64_t share = (total + parts - 1) / parts;
  parallel_for_parts(threads, parts, [&](int64_t part) {
    int64_t pos = std::min(total, part * share);
    const int64_t end = std::min(total, pos + share);
    while (pos < end) {  // one pair's piece of the range at a time
      const int64_t pair = pos / per_pair, in_pair = pos - pair * per_pair;
      const int64_t n = std::min(end - pos, per_pair - in_pair);
      copy_stream_range(dst_bases[pair], src_bases[pair], stream, in_pair, in_pair + n);
      pos += n;
    }
  });
}

namespace {

// Moves the `len` bytes (whole pages) at `src` to `dst` (page-aligned, not overlapping) by moving page table
// entries, without freeing or zeroing a page: src's pages go to a fresh reservation, dst's pages take their place
// at src, the reserved ones land at dst. DONTUNMAP keeps src and dst mapped throughout (a concurrent mmap in
// another thread can never be handed an address inside the buffer). Afterwards src holds dst's old bytes. Returns
// false, with nothing changed, when the kernel refuses the first move (then the caller copies).
bool swap_pages(uint8_t* src, uint8_t* dst, size_t len) {
  void* tmp = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (tmp == MAP_FAILED) return false;
  constexpr int kMove = MREMAP_MAYMOVE | MREMAP_FIXED;
  if (mremap(src, len, len, kMove | MREMAP_DONTUNMAP, tmp) == MAP_FAILED) {
    munmap(tmp, len);
    return false;
  }
  // src's bytes are safe at tmp now; src reads as zeros. Give dst's pages to src (so that placing tmp's at dst
  // frees nothing); if the kernel refuses, dst's pages are simply freed below.
  (void)mremap(dst, len, len, kMove | MREMAP_DONTUNMAP, src);
  if (mremap(tmp, len, len, kMove, dst) == MAP_FAILED) {
    std::memcpy(dst, tmp, len);
    munmap(tmp, len);
  }
  return true;
}

}  // namespace

int64_t remap_boxes_ordered_cpu(uint8_t* buf, const int64_t* rows, int64_t num_boxes, int64_t min_remap_bytes) {
  struct Run {
    int64_t src, dst, n;
  };
  std::vector<Run> runs;
  for (int64_t i = 0; i < num_boxes; ++i) {
    const Box b = box_from_row(rows + i * kBoxFields);
    const int64_t count = b.run_bytes > 0 ? box_num_runs(b) : 0;
    for (int64_t r = 0; r < count; ++r) {
      Run run{0, 0, b.run_bytes};
      box_run_offsets(b, r, &run.src, &run.dst);
      runs.push_back(run);
    }
  }
  // A remapped run's source ends up holding other bytes: exact only if no run reads what another one read.
  std::vector<std::pair<int64_t, int64_t>> sources;
  sources.reserve(runs.size());
  for (const Run& r : runs) sources.emplace_back(r.src, r.src + r.n);
  std::sort(sources.begin(), sources.end());
  bool disjoint = true;
  for (size_t i = 1; i < sources.size() && disjoint; ++i) disjoint = sources[i].first >= sources[i - 1].second;
  const int64_t page = static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  bool can_remap = disjoint && page > 0 && min_remap_bytes > 0;
  int64_t remapped = 0;
  for (const Run& r : runs) {
    if (r.src == r.dst || r.n == 0) continue;
    uint8_t* src = buf + r.src;
    uint8_t* dst = buf + r.dst;
    const int64_t distance = r.src > r.dst ? r.src - r.dst : r.dst - r.src;
    const auto dst_addr = reinterpret_cast<uintptr_t>(dst);
    const int64_t head = static_cast<int64_t>((page - static_cast<int64_t>(dst_addr % page)) % page);
    const int64_t middle = r.n > head ? (r.n - head) / page * page : 0;
    if (can_remap && r.n >= min_remap_bytes && distance >= r.n && distance % page == 0 && middle > 0) {
      if (swap_pages(src + head, dst + head, static_cast<size_t>(middle))) {
        std::memcpy(dst, src, static_cast<size_t>(head));  // the partial pages at both ends
        std::memcpy(dst + head + middle, src + head + middle, static_cast<size_t>(r.n - head - middle));
        remapped += middle;
        continue;
      }
      can_remap = false;  // refused (an old kernel, a mapping it cannot move): copy from here on
    }
    std::memmove(dst, src, static_cast<size_t>(r.n));
  }
  return remapped;
}

void copy_boxes_cpu(uint8_t* dst, const uint8_t* src, const int64_t* rows, int64_t num_boxes, int num_threads,
                    bool ordered) {
  copy_boxes_bases_cpu(&dst, &src, 1, rows, num_boxes, num_threads, ordered);
}

}  // namespace amoeba
