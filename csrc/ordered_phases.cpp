// Planner and CPU executor of ordered (in-place) relayouts as parallel phases (see ordered_phases.h).
//
// Correctness argument
// --------------------
// 1. Runs to pieces. A run (src s, dst d, n bytes) is a memmove. The planner may cut it into pieces that are
//    applied one after another as plain copies. That equals the memmove when no piece reads bytes an earlier
//    piece of the same run wrote: pieces go from the run's start when d <= s (a piece writes [d+o, d+o+k), below
//    every later piece's source [s+o', ...) with o' >= o + k > o) and from its end when d > s and the run overlaps
//    itself (the mirror image). A run with d == s or n == 0 changes nothing and is dropped. So the sequence of all
//    pieces, applied one by one, gives the bytes of the ordered semantics.
// 2. Steps. Consecutive pieces form a step. A step of pieces P1..Pm applied one by one equals
//    - one parallel copy (direct step) when no piece writes a byte that another piece of the step reads or
//      writes, and no piece overlaps itself: then every byte the step reads is unchanged during the step, so each
//      piece reads the values the sequential order would show it, and every written byte has exactly one writer,
//      so the interleaving of the copies does not matter;
//    - a gather of every piece's source into disjoint scratch ranges, then a scatter to the destinations (staged
//      step), when no piece reads a byte that an EARLIER piece of the step writes (read-after-write) and no two
//      pieces write the same byte (write-after-write). Writes to bytes that earlier pieces read are allowed: all
//      reads happen in the gather, before any write. A piece may overlap itself (the gather reads it whole).
//    The scratch never overlaps the buffer (the callers check), so the gather reads the step's initial bytes.
// 3. Phases run in stream (or program) order, each completing before the next starts, so steps compose.
// The checks use the convex hull of the step's source and destination ranges so far (one interval each): a
// piece that misses the hull misses every range in it, so the checks are conservative, never wrong. For the
// compaction the planners emit (runs in increasing address order, each moving down) the hulls are exact enough:
// a staged step never conflicts (it ends when the scratch is full), and a direct step ends when a destination
// reaches the first source of the step, so direct steps grow geometrically (a 2:1 compaction of R rows takes
// about log2(R) of them).
//
// Choosing between direct and staged: a direct step moves each byte once, a staged one twice, and every phase
// costs a fixed overhead worth `launch_bytes` of copying. From the current position the planner measures the
// longest direct step (D bytes); it takes it when D >= launch_bytes / 4 or there is no scratch; otherwise it
// measures the longest staged step (S bytes, at most the scratch and at most kStagedStepLaunches x launch_bytes)
// and takes the direct step only if D >= S / 2. The cap on S matters for compaction: its first direct steps are
// tiny (row 1 lands on row 0), so staging starts it, but a staged step of the whole buffer would copy every byte
// twice, while after a few launches' worth of staged bytes the direct steps are long enough (they double).
// Both scans stop at their first conflict, so planning is linear in the number of pieces up to a small factor.
#include "ordered_phases.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "box_copy.h"
#include "copy_pool.h"

namespace amoeba {

namespace {

// Convex hull of byte ranges; empty until the first add.
struct Hull {
  int64_t lo = std::numeric_limits<int64_t>::max();
  int64_t hi = std::numeric_limits<int64_t>::min();
  bool overlaps(int64_t at, int64_t n) const { return at < hi && lo < at + n; }
  void add(int64_t at, int64_t n) {
    lo = std::min(lo, at);
    hi = std::max(hi, at + n);
  }
};

struct Piece {
  int64_t src, dst, bytes, packed;  // packed: scratch offset (staged steps only)
};

// A position in the run sequence: run `run` of box `box`, of which `done` bytes are planned already (counted from
// the run's end for a run that moves up onto itself, from its start otherwise).
struct Cursor {
  int64_t box = 0, run = 0, done = 0;
};

struct Run {
  int64_t src, dst, bytes;
  bool self_overlap() const { return std::abs(dst - src) < bytes; }
  bool from_end() const { return dst > src && self_overlap(); }
  // Source and destination offsets of the next k bytes after `done`.
  int64_t offset(int64_t done, int64_t k) const { return from_end() ? bytes - done - k : done; }
};

class RunSequence {
 public:
  explicit RunSequence(const int64_t* rows, int64_t num_boxes) {
    boxes_.reserve(static_cast<size_t>(num_boxes));
    for (int64_t i = 0; i < num_boxes; ++i) boxes_.push_back(box_from_row(rows + i * kBoxFields));
  }

  bool at_end(const Cursor& c) const { return c.box >= static_cast<int64_t>(boxes_.size()); }

  Run run(const Cursor& c) const {
    const Box& b = boxes_[c.box];
    Run r;
    box_run_offsets(b, c.run, &r.src, &r.dst);
    r.bytes = b.run_bytes;
    return r;
  }

  // Moves past finished and no-op runs (n == 0 or src == dst) to the next run with bytes left to plan.
  void settle(Cursor* c) const {
    while (!at_end(*c)) {
      const Box& b = boxes_[c->box];
      if (b.run_bytes == 0 || c->run >= box_num_runs(b)) {
        ++c->box;
        c->run = c->done = 0;
        continue;
      }
      const Run r = run(*c);
      if (c->done >= r.bytes || r.src == r.dst) {
        ++c->run;
        c->done = 0;
        continue;
      }
      return;
    }
  }

 private:
  std::vector<Box> boxes_;
};

// The longest direct step from c; appends its pieces and returns the cursor after it.
Cursor scan_direct(const RunSequence& seq, Cursor c, std::vector<Piece>* out, int64_t* bytes) {
  Hull reads, writes;
  *bytes = 0;
  for (seq.settle(&c); !seq.at_end(c); seq.settle(&c)) {
    const Run r = seq.run(c);
    const int64_t left = r.bytes - c.done;
    // A piece of a run that overlaps itself is at most the shift long, so it does not overlap itself.
    const int64_t k = r.self_overlap() ? std::min(left, std::abs(r.dst - r.src)) : left;
    const int64_t o = r.offset(c.done, k);
    const int64_t s = r.src + o, d = r.dst + o;
    if (writes.overlaps(d, k) || reads.overlaps(d, k) || writes.overlaps(s, k)) break;
    out->push_back({s, d, k, 0});
    reads.add(s, k);
    writes.add(d, k);
    *bytes += k;
    c.done += k;
  }
  return c;
}

// The longest staged step from c within `capacity` bytes of scratch; appends its pieces (with their scratch
// offsets) and returns the cursor after it.
Cursor scan_staged(const RunSequence& seq, Cursor c, int64_t capacity, std::vector<Piece>* out, int64_t* bytes) {
  constexpr int64_t kAlign = 16;  // a piece sits in scratch at its source's phase modulo 16 (full-width copies)
  Hull writes;
  int64_t used = 0;
  *bytes = 0;
  for (seq.settle(&c); !seq.at_end(c); seq.settle(&c)) {
    const int64_t room = capacity - used - (kAlign - 1);
    if (room <= 0) break;
    const Run r = seq.run(c);
    const int64_t k = std::min(r.bytes - c.done, room);
    const int64_t o = r.offset(c.done, k);
    const int64_t s = r.src + o, d = r.dst + o;
    if (writes.overlaps(s, k) || writes.overlaps(d, k)) break;
    const int64_t packed = used + ((s - used) % kAlign + kAlign) % kAlign;
    out->push_back({s, d, k, packed});
    writes.add(d, k);
    used = packed + k;
    *bytes += k;
    c.done += k;
  }
  return c;
}

// Appends a one-run copy to the phase that starts at row `first`, extending the last row into a level-0 box
// while the runs keep equal lengths and constant non-negative strides (order inside a phase does not matter).
void append_run(std::vector<int64_t>* rows, size_t first, int64_t src, int64_t dst, int64_t bytes) {
  const size_t n = rows->size() / kBoxFields;
  if (n > first) {
    int64_t* last = rows->data() + (n - 1) * kBoxFields;
    if (last[kRunBytes] == bytes) {
      const int64_t c = last[kCount0];
      if (c == 1) {
        const int64_t ss = src - last[kSrcOffset], ds = dst - last[kDstOffset];
        if (ss >= 0 && ds > 0) {
          last[kCount0] = 2;
          last[kSrcStride0] = ss;
          last[kDstStride0] = ds;
          return;
        }
      } else if (src == last[kSrcOffset] + c * last[kSrcStride0] && dst == last[kDstOffset] + c * last[kDstStride0]) {
        last[kCount0] = c + 1;
        return;
      }
    }
  }
  const int64_t row[kBoxFields] = {src, dst, bytes, 1, 0, 0, 1, 0, 0, 1, 0, 0};
  rows->insert(rows->end(), row, row + kBoxFields);
}

}  // namespace

OrderedPhases plan_ordered_phases(const int64_t* rows, int64_t num_boxes, int64_t buf_nbytes,
                                  int64_t scratch_nbytes, int64_t launch_bytes) {
  validate_boxes(rows, num_boxes, buf_nbytes, buf_nbytes);
  const RunSequence seq(rows, num_boxes);
  constexpr int64_t kStagedStepLaunches = 8;
  const int64_t staged_step = launch_bytes > std::numeric_limits<int64_t>::max() / kStagedStepLaunches
                                  ? scratch_nbytes
                                  : std::min(scratch_nbytes, kStagedStepLaunches * launch_bytes);
  const bool can_stage = staged_step >= kMinStagingBytes;
  OrderedPhases plan;
  plan.starts.push_back(0);
  auto close_phase = [&](PhaseKind kind) {
    plan.kinds.push_back(kind);
    plan.starts.push_back(static_cast<int64_t>(plan.rows.size() / kBoxFields));
  };
  std::vector<Piece> direct, staged;
  Cursor pos;
  for (seq.settle(&pos); !seq.at_end(pos); seq.settle(&pos)) {
    direct.clear();
    int64_t direct_bytes = 0, staged_bytes = 0;
    const Cursor after_direct = scan_direct(seq, pos, &direct, &direct_bytes);
    bool use_direct = true;
    Cursor after_staged;
    if (can_stage && direct_bytes < launch_bytes / 4) {
      staged.clear();
      after_staged = scan_staged(seq, pos, staged_step, &staged, &staged_bytes);
      use_direct = 2 * direct_bytes >= staged_bytes;
    }
    const size_t first = plan.rows.size() / kBoxFields;
    if (use_direct) {
      for (const Piece& p : direct) append_run(&plan.rows, first, p.src, p.dst, p.bytes);
      close_phase(kPhaseDirect);
      pos = after_direct;
    } else {
      for (const Piece& p : staged) append_run(&plan.rows, first, p.src, p.packed, p.bytes);
      close_phase(kPhaseGather);
      const size_t scatter_first = plan.rows.size() / kBoxFields;
      for (const Piece& p : staged) append_run(&plan.rows, scatter_first, p.packed, p.dst, p.bytes);
      close_phase(kPhaseScatter);
      pos = after_staged;
    }
  }
  return plan;
}

void validate_phases(const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                     int64_t num_rows, int64_t buf_nbytes, int64_t scratch_nbytes) {
  if (num_phases < 0 || starts[0] != 0 || starts[num_phases] != num_rows) {
    std::ostringstream msg;
    msg << "phase table: starts must run from 0 to the number of rows " << num_rows << ", got " << starts[0]
        << " .. " << starts[num_phases];
    throw std::invalid_argument(msg.str());
  }
  for (int64_t p = 0; p < num_phases; ++p) {
    if (starts[p + 1] < starts[p]) {
      throw std::invalid_argument("phase table: starts decrease at phase " + std::to_string(p));
    }
    int64_t src_nbytes = buf_nbytes, dst_nbytes = buf_nbytes;
    switch (kinds[p]) {
      case kPhaseDirect: break;
      case kPhaseGather: dst_nbytes = scratch_nbytes; break;
      case kPhaseScatter: src_nbytes = scratch_nbytes; break;
      default:
        throw std::invalid_argument("phase table: phase " + std::to_string(p) + " has unknown kind " +
                                    std::to_string(int(kinds[p])));
    }
    try {
      validate_boxes(rows + starts[p] * kBoxFields, starts[p + 1] - starts[p], src_nbytes, dst_nbytes);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("phase " + std::to_string(p) + ": " + e.what());
    }
  }
}

void copy_phases_cpu(uint8_t* const* buf_bases, uint8_t* const* scratch_bases, int64_t num_layers,
                     const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                     int num_threads) {
  for (int64_t p = 0; p < num_phases; ++p) {
    const int64_t* phase_rows = rows + starts[p] * kBoxFields;
    const int64_t n = starts[p + 1] - starts[p];
    uint8_t* const* dst = kinds[p] == kPhaseGather ? scratch_bases : buf_bases;
    uint8_t* const* src = kinds[p] == kPhaseScatter ? scratch_bases : buf_bases;
    copy_boxes_bases_cpu(dst, src, num_layers, phase_rows, n, num_threads, false);
  }
}

}  // namespace amoeba
