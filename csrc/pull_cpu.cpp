// Same-host pull: copy boxes straight out of another process's memory into this one (Linux cross-memory attach,
// process_vm_readv). The receiving rank reads the bytes it needs from its peer's buffer and writes them to their
// final place in one pass: no staging, no scratch, no sender-side work. Boxes are as in box_copy.h, with source
// offsets relative to the peer's buffer and destination offsets relative to the local one.
//
// Permissions: the kernel allows it between processes of the same user when ptrace would be allowed; with Yama's
// ptrace_scope = 1 a process must first name its readers (allow_pulls_from_any() calls prctl(PR_SET_PTRACER, ANY)).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/prctl.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "box_copy.h"
#include "copy_pool.h"

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#ifndef PR_SET_PTRACER_ANY
#define PR_SET_PTRACER_ANY ((unsigned long)-1)
#endif

namespace py = pybind11;

namespace amoeba {
namespace {

constexpr size_t kIovBatch = 1024;               // IOV_MAX on Linux
constexpr int64_t kBytesPerThread = 4 << 20;     // below this a second thread costs more than it saves

class PullError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_read_error(int pid, int err) {
  throw PullError("process_vm_readv from pid " + std::to_string(pid) + " failed: " + std::strerror(err) +
                  (err == ESRCH ? " (the peer process is gone)" : "") +
                  (err == EPERM ? " (not permitted: same user and ptrace access are required)" : ""));
}

// Reads every iovec pair completely (process_vm_readv may stop early, at or inside an iovec).
void read_all(int pid, std::vector<iovec>& liov, std::vector<iovec>& riov) {
  size_t done = 0;
  while (done < liov.size()) {
    const ssize_t got = process_vm_readv(pid, liov.data() + done, liov.size() - done, riov.data() + done,
                                         riov.size() - done, 0);
    if (got < 0) throw_read_error(pid, errno);
    if (got == 0) throw PullError("process_vm_readv from pid " + std::to_string(pid) + " read nothing");
    size_t left = static_cast<size_t>(got);
    while (done < liov.size() && left >= liov[done].iov_len) {
      left -= liov[done].iov_len;
      ++done;
    }
    if (left > 0) {  // stopped inside an iovec: go on from there
      liov[done].iov_base = static_cast<uint8_t*>(liov[done].iov_base) + left;
      liov[done].iov_len -= left;
      riov[done].iov_base = static_cast<uint8_t*>(riov[done].iov_base) + left;
      riov[done].iov_len -= left;
    }
  }
  liov.clear();
  riov.clear();
}

// The kernel pins the pages of every remote iovec separately (~0.5 us each), so runs below kSmallRun are not read
// one by one: consecutive runs whose source span is at most kBounceBytes, with gaps of at most kMaxGapRatio times
// the run, are read as that one span into a bounce buffer and copied out locally (reading some gap bytes is far
// cheaper than an iovec per run: 1 KiB runs at a 2 KiB stride go from ~1.7 to ~4 GB/s).
constexpr int64_t kSmallRun = 4096;
constexpr int64_t kBounceBytes = 1 << 20;
constexpr int64_t kMaxGapRatio = 3;

// Reads the runs of boxes [first, last) from process `pid`; throws PullError on failure.
void pull_range(int pid, uint8_t* local, uint64_t remote, const std::vector<Box>& boxes, size_t first,
                size_t last) {
  std::vector<iovec> liov, riov;
  liov.reserve(kIovBatch);
  riov.reserve(kIovBatch);
  std::vector<uint8_t> bounce;
  std::vector<std::pair<int64_t, int64_t>> group;  // (src, dst) offsets of the runs in the current span
  int64_t group_run = 0;
  auto add_direct = [&](int64_t s, int64_t d, int64_t n) {
    if (!liov.empty() && static_cast<uint8_t*>(liov.back().iov_base) + liov.back().iov_len == local + d &&
        reinterpret_cast<uint64_t>(riov.back().iov_base) + riov.back().iov_len == remote + static_cast<uint64_t>(s)) {
      liov.back().iov_len += n;  // adjacent on both sides: one iovec
      riov.back().iov_len += n;
      return;
    }
    liov.push_back({local + d, static_cast<size_t>(n)});
    riov.push_back({reinterpret_cast<void*>(remote + static_cast<uint64_t>(s)), static_cast<size_t>(n)});
    if (liov.size() == kIovBatch) read_all(pid, liov, riov);
  };
  auto flush_group = [&]() {
    if (group.size() == 1) {
      add_direct(group[0].first, group[0].second, group_run);
    } else if (!group.empty()) {
      const int64_t start = group.front().first, span = group.back().first + group_run - start;
      bounce.resize(static_cast<size_t>(std::max<int64_t>(span, static_cast<int64_t>(bounce.size()))));
      std::vector<iovec> bl{{bounce.data(), static_cast<size_t>(span)}};
      std::vector<iovec> br{{reinterpret_cast<void*>(remote + static_cast<uint64_t>(start)), static_cast<size_t>(span)}};
      read_all(pid, bl, br);
      for (const auto& [s, d] : group) std::memcpy(local + d, bounce.data() + (s - start), group_run);
    }
    group.clear();
  };
  for (size_t bi = first; bi < last; ++bi) {
    const Box& b = boxes[bi];
    if (b.run_bytes == 0) continue;
    const int64_t runs = box_num_runs(b);
    const bool small = b.run_bytes < kSmallRun;
    for (int64_t run = 0; run < runs; ++run) {
      int64_t s, d;
      box_run_offsets(b, run, &s, &d);
      if (!small) {
        add_direct(s, d, b.run_bytes);
        continue;
      }
      if (!group.empty()) {
        const int64_t prev_end = group.back().first + group_run;
        if (b.run_bytes != group_run || s < prev_end || s - prev_end > kMaxGapRatio * group_run ||
            s + b.run_bytes - group.front().first > kBounceBytes) {
          flush_group();
        }
      }
      group_run = b.run_bytes;
      group.emplace_back(s, d);
    }
    flush_group();
  }
  if (!liov.empty()) read_all(pid, liov, riov);
}

int64_t pull_boxes(int64_t pid, uintptr_t remote, int64_t remote_nbytes, uintptr_t local, int64_t local_nbytes,
                   const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& array, int num_threads) {
  if (array.ndim() != 2 || array.shape(1) != kBoxFields) {
    throw std::invalid_argument("boxes must have shape (num_boxes, " + std::to_string(kBoxFields) + ")");
  }
  const int64_t* rows = array.data();
  const int64_t num_boxes = array.shape(0);
  const int64_t total = validate_boxes(rows, num_boxes, remote_nbytes, local_nbytes);
  std::vector<Box> boxes;
  boxes.reserve(static_cast<size_t>(num_boxes));
  for (int64_t i = 0; i < num_boxes; ++i) boxes.push_back(box_from_row(rows + i * kBoxFields));
  py::gil_scoped_release release;
  int threads = num_threads > 0 ? std::min(num_threads, kMaxCopyThreads) : default_copy_threads();
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, total / kBytesPerThread)));
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, num_boxes)));
  uint8_t* dst = reinterpret_cast<uint8_t*>(local);
  // Contiguous ranges of boxes with about equal bytes each, one per thread of the shared copy pool.
  std::vector<size_t> cut{0};
  int64_t acc = 0, share = (total + threads - 1) / threads;
  for (size_t i = 0; i < boxes.size() && threads > 1; ++i) {
    acc += boxes[i].run_bytes * box_num_runs(boxes[i]);
    if (acc >= share * static_cast<int64_t>(cut.size()) && cut.size() < static_cast<size_t>(threads)) {
      cut.push_back(i + 1);
    }
  }
  if (cut.back() != boxes.size()) cut.push_back(boxes.size());
  const int64_t parts = static_cast<int64_t>(cut.size()) - 1;
  std::vector<std::string> errors(static_cast<size_t>(parts));
  parallel_for_parts(threads, parts, [&](int64_t t) {
    try {
      pull_range(static_cast<int>(pid), dst, remote, boxes, cut[t], cut[t + 1]);
    } catch (const std::exception& e) {
      errors[t] = e.what();
    }
  });
  for (const auto& e : errors) {
    if (!e.empty()) throw PullError(e);
  }
  return total;
}

// One aligned int64 of process `pid` (a peer's progress counter), read until two reads agree (no torn value).
int64_t peek_int64(int64_t pid, uintptr_t address) {
  int64_t values[2];
  for (int attempt = 0;; ++attempt) {
    for (int64_t& v : values) {
      iovec local{&v, sizeof(v)}, remote{reinterpret_cast<void*>(address), sizeof(v)};
      if (process_vm_readv(static_cast<pid_t>(pid), &local, 1, &remote, 1, 0) != sizeof(v)) {
        const int err = errno;
        throw PullError("reading the progress counter of pid " + std::to_string(pid) + " failed: " +
                        std::strerror(err) + (err == ESRCH ? " (the peer process is gone)" : "") +
                        (err == EPERM ? " (not permitted: same user and ptrace access are required)" : ""));
      }
    }
    if (values[0] == values[1] || attempt == 8) return values[1];
  }
}

}  // namespace

void register_pull_bindings(py::module_& m) {
  py::register_exception<PullError>(m, "PullError", PyExc_RuntimeError);
  m.def("pull_boxes", &pull_boxes, py::arg("pid"), py::arg("remote"), py::arg("remote_nbytes"), py::arg("local"),
        py::arg("local_nbytes"), py::arg("boxes"), py::arg("num_threads") = 0,
        "Copy every box from the buffer at address `remote` (remote_nbytes bytes) of process `pid` into the local "
        "buffer at `local` with process_vm_readv; returns the bytes copied; raises PullError on failure.");
  m.def("peek_int64", &peek_int64, py::arg("pid"), py::arg("address"),
        "The int64 at `address` in process `pid`; raises PullError on failure.");
  m.def("allow_pulls_from_any", [](bool allow) {
          return prctl(PR_SET_PTRACER, allow ? PR_SET_PTRACER_ANY : 0UL, 0, 0, 0) == 0;
        }, py::arg("allow") = true,
        "Let any process of this user read this one's memory (needed under Yama ptrace_scope 1), or with "
        "allow=False withdraw that; returns False where the kernel has no Yama (nothing to allow).");
}

}  // namespace amoeba
