// CPU byte engine: batched strided copies split across threads by bytes.
#include <algorithm>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

#include "box_copy.h"

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

// Copies the bytes [begin, end) of the logical stream formed by concatenating every run of every box.
void copy_stream_range(uint8_t* dst, const uint8_t* src, const std::vector<Box>& boxes,
                       const std::vector<int64_t>& box_start, int64_t begin, int64_t end) {
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

}  // namespace

void copy_boxes_cpu(uint8_t* dst, const uint8_t* src, const int64_t* rows, int64_t num_boxes, int num_threads,
                    bool ordered) {
  std::vector<Box> boxes;
  boxes.reserve(num_boxes);
  std::vector<int64_t> box_start(1, 0);
  for (int64_t i = 0; i < num_boxes; ++i) {
    boxes.push_back(box_from_row(rows + i * kBoxFields));
    box_start.push_back(box_start.back() + boxes.back().run_bytes * box_num_runs(boxes.back()));
  }
  const int64_t total = box_start.back();
  if (ordered) {
    for (const Box& b : boxes) {
      const int64_t runs = box_num_runs(b);
      for (int64_t r = 0; r < runs; ++r) {
        int64_t s, d;
        box_run_offsets(b, r, &s, &d);
        std::memmove(dst + d, src + s, static_cast<size_t>(b.run_bytes));
      }
    }
    return;
  }
  // Below ~1 MiB per thread the thread start-up costs more than it saves.
  constexpr int64_t kMinBytesPerThread = int64_t(1) << 20;
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  num_threads = static_cast<int>(std::min<int64_t>(num_threads, std::max<int64_t>(1, total / kMinBytesPerThread)));
  if (num_threads <= 1) {
    copy_stream_range(dst, src, boxes, box_start, 0, total);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t share = (total + num_threads - 1) / num_threads;
  for (int t = 1; t < num_threads; ++t) {
    const int64_t begin = std::min(total, t * share), end = std::min(total, (t + 1) * share);
    workers.emplace_back(copy_stream_range, dst, src, std::cref(boxes), std::cref(box_start), begin, end);
  }
  copy_stream_range(dst, src, boxes, box_start, 0, std::min(total, share));
  for (auto& w : workers) w.join();
}

}  // namespace amoeba
