// In-place relayout ("ordered" boxes) as a short sequence of parallel phases.
//
// Ordered semantics: the runs of the boxes are applied one after another (box order, level 0 fastest inside a
// box), each as a memmove inside one buffer. Done literally that is a chain of dependent copies; a GPU (or a
// thread pool) wants a few large parallel copies. plan_ordered_phases cuts the run sequence into steps, each
// executed as
//   direct: one parallel copy buf -> buf                                        (one phase), or
//   staged: one parallel copy buf -> scratch, then one scratch -> buf          (a gather and a scatter phase),
// so that running the phases in order, each phase with any interleaving of its byte copies, gives exactly the
// bytes of the sequential memmoves. The correctness argument is at the top of ordered_phases.cpp.
//
// The plan depends only on the boxes and the sizes, not on the buffers, so one plan serves every layer of a
// model (each layer a separate buffer, with its own scratch slice).
#pragma once

#include <cstdint>
#include <vector>

namespace amoeba {

enum PhaseKind : int8_t { kPhaseDirect = 0, kPhaseGather = 1, kPhaseScatter = 2 };

struct OrderedPhases {
  std::vector<int8_t> kinds;    // one PhaseKind per phase
  std::vector<int64_t> starts;  // kinds.size() + 1 offsets: phase p is rows [starts[p], starts[p + 1])
  std::vector<int64_t> rows;    // boxes (kBoxFields per row); scratch offsets are from the scratch base
};

// Scratch below this many bytes is not used for staging (a step would move too little to pay for two phases).
constexpr int64_t kMinStagingBytes = 64;

// Plans the phases of an in-place relayout of a buffer of buf_nbytes bytes, staging through at most
// scratch_nbytes bytes of scratch (0: direct phases only). launch_bytes is the executor's fixed cost of one phase
// expressed in bytes it could copy meanwhile (e.g. 8 MiB for a GPU launch); it only steers the choice between
// direct and staged steps, never correctness. Throws std::invalid_argument for a box outside the buffer.
OrderedPhases plan_ordered_phases(const int64_t* rows, int64_t num_boxes, int64_t buf_nbytes,
                                  int64_t scratch_nbytes, int64_t launch_bytes);

// Checks a phase table before it is executed: kinds known, starts increasing from 0 to num_rows, every row within
// the buffers its kind reads and writes (direct: buf -> buf, gather: buf -> scratch, scatter: scratch -> buf).
// Throws std::invalid_argument naming the phase.
void validate_phases(const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                     int64_t num_rows, int64_t buf_nbytes, int64_t scratch_nbytes);

// CPU executor: runs the (validated) phases for every layer l < num_layers on buf_bases[l] with scratch
// scratch_bases[l]; each phase is one parallel copy over all layers on the persistent pool.
void copy_phases_cpu(uint8_t* const* buf_bases, uint8_t* const* scratch_bases, int64_t num_layers,
                     const int8_t* kinds, int64_t num_phases, const int64_t* starts, const int64_t* rows,
                     int num_threads);

}  // namespace amoeba
