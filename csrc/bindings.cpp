// pybind11 module amoeba_core._C. Takes raw data pointers and byte sizes (never libtorch objects), so the module is
// independent of the torch version. The Python side owns every buffer and keeps it alive for the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "box_copy.h"
#include "copy_pool.h"
#include "ordered_phases.h"
#include "py_arrays.h"

namespace py = pybind11;

namespace amoeba {
void register_elastic_bindings(py::module_& m);  // csrc/elastic_bindings.cpp
void register_pull_bindings(py::module_& m);     // csrc/pull_cpu.cpp
void register_box_build_bindings(py::module_& m);  // csrc/box_build.cpp
#ifdef AMOEBA_WITH_CUDA
void register_cuda_bindings(py::module_& m);  // csrc/cuda/bindings_cuda.cpp
#endif
}  // namespace amoeba

namespace {

using amoeba::BaseArray;
using amoeba::BoxArray;
using amoeba::checked_bases;
using amoeba::checked_phase_table;
using amoeba::checked_rows;
using amoeba::KindArray;

template <typename T>
std::vector<T*> as_pointers(const std::vector<uint64_t>& addresses) {
  std::vector<T*> out;
  out.reserve(addresses.size());
  for (uint64_t a : addresses) out.push_back(reinterpret_cast<T*>(static_cast<uintptr_t>(a)));
  return out;
}

int64_t copy_boxes(uintptr_t dst, int64_t dst_nbytes, uintptr_t src, int64_t src_nbytes, const BoxArray& boxes,
                   int num_threads, bool ordered) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  const int64_t total = amoeba::validate_boxes(rows, num_boxes, src_nbytes, dst_nbytes);
  py::gil_scoped_release release;
  amoeba::copy_boxes_cpu(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), rows, num_boxes,
                         num_threads, ordered);
  return total;
}

int64_t copy_boxes_bases(const BaseArray& dst_bases, int64_t dst_nbytes, const BaseArray& src_bases,
                         int64_t src_nbytes, const BoxArray& boxes, int num_threads, bool ordered) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  const std::vector<uint8_t*> dst = as_pointers<uint8_t>(checked_bases(dst_bases, "dst_bases", -1));
  const std::vector<const uint8_t*> src =
      as_pointers<const uint8_t>(checked_bases(src_bases, "src_bases", static_cast<int64_t>(dst.size())));
  const int64_t per_pair = amoeba::validate_boxes(rows, num_boxes, src_nbytes, dst_nbytes);
  py::gil_scoped_release release;
  amoeba::copy_boxes_bases_cpu(dst.data(), src.data(), static_cast<int64_t>(dst.size()), rows, num_boxes,
                               num_threads, ordered);
  return per_pair * static_cast<int64_t>(dst.size());
}

int64_t remap_boxes_ordered(uintptr_t buf, int64_t buf_nbytes, const BoxArray& boxes, int64_t min_remap_bytes) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  amoeba::validate_boxes(rows, num_boxes, buf_nbytes, buf_nbytes);
  py::gil_scoped_release release;
  return amoeba::remap_boxes_ordered_cpu(reinterpret_cast<uint8_t*>(buf), rows, num_boxes, min_remap_bytes);
}

py::tuple plan_ordered_phases(const BoxArray& boxes, int64_t buf_nbytes, int64_t scratch_nbytes,
                              int64_t launch_bytes) {
  const int64_t* rows = checked_rows(boxes);
  const int64_t num_boxes = boxes.shape(0);
  amoeba::OrderedPhases plan;
  {
    py::gil_scoped_release release;
    plan = amoeba::plan_ordered_phases(rows, num_boxes, buf_nbytes, scratch_nbytes, launch_bytes);
  }
  const py::ssize_t phases = static_cast<py::ssize_t>(plan.kinds.size());
  const py::ssize_t num_rows = static_cast<py::ssize_t>(plan.rows.size() / amoeba::kBoxFields);
  py::array_t<int8_t> kinds(phases);
  py::array_t<int64_t> starts(phases + 1);
  py::array_t<int64_t> out_rows({num_rows, static_cast<py::ssize_t>(amoeba::kBoxFields)});
  std::copy(plan.kinds.begin(), plan.kinds.end(), kinds.mutable_data());
  std::copy(plan.starts.begin(), plan.starts.end(), starts.mutable_data());
  std::copy(plan.rows.begin(), plan.rows.end(), out_rows.mutable_data());
  return py::make_tuple(kinds, starts, out_rows);
}

void copy_phases(const BaseArray& buf_bases, int64_t buf_nbytes, const BaseArray& scratch_bases,
                 int64_t scratch_nbytes, const KindArray& kinds, const BoxArray& starts, const BoxArray& rows,
                 int num_threads) {
  const int64_t phases = checked_phase_table(kinds, starts, rows);
  const std::vector<uint8_t*> bufs = as_pointers<uint8_t>(checked_bases(buf_bases, "buf_bases", -1));
  std::vector<uint8_t*> scratch(bufs.size(), nullptr);
  if (scratch_nbytes > 0) {
    scratch = as_pointers<uint8_t>(checked_bases(scratch_bases, "scratch_bases", static_cast<int64_t>(bufs.size())));
  }
  amoeba::validate_phases(kinds.data(), phases, starts.data(), rows.data(), rows.shape(0), buf_nbytes,
                          scratch_nbytes);
  py::gil_scoped_release release;
  amoeba::copy_phases_cpu(bufs.data(), scratch.data(), static_cast<int64_t>(bufs.size()), kinds.data(), phases,
                          starts.data(), rows.data(), num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "amoeba_core byte engine: batched strided copies on raw buffers (CPU, and CUDA when compiled), and "
            "elastic memory regions (a reserved address range with a mapped prefix that grows and shrinks).";
  m.attr("BOX_FIELDS") = static_cast<int>(amoeba::kBoxFields);
  m.attr("PHASE_DIRECT") = static_cast<int>(amoeba::kPhaseDirect);
  m.attr("PHASE_GATHER") = static_cast<int>(amoeba::kPhaseGather);
  m.attr("PHASE_SCATTER") = static_cast<int>(amoeba::kPhaseScatter);
  m.attr("MIN_BYTES_PER_THREAD") = amoeba::kMinBytesPerThread;
  m.def("copy_boxes", &copy_boxes, py::arg("dst"), py::arg("dst_nbytes"), py::arg("src"), py::arg("src_nbytes"),
        py::arg("boxes"), py::arg("num_threads") = 0, py::arg("ordered") = false,
        "Copy every box (int64 array (N, BOX_FIELDS)) from host buffer src to host buffer dst; returns bytes copied. "
        "num_threads <= 0: the default (set_copy_threads, else the process's CPU affinity count); batches under "
        "MIN_BYTES_PER_THREAD per thread use fewer threads, small ones only the calling thread. ordered=True copies "
        "box by box with memmove semantics on one thread (for in-place relayout).");
  m.def("copy_boxes_bases", &copy_boxes_bases, py::arg("dst_bases"), py::arg("dst_nbytes"), py::arg("src_bases"),
        py::arg("src_nbytes"), py::arg("boxes"), py::arg("num_threads") = 0, py::arg("ordered") = false,
        "Apply the same boxes once per pair (dst_bases[p], src_bases[p]) of host buffers (uint64 address arrays of "
        "equal length; every dst buffer dst_nbytes long, every src buffer src_nbytes long), the whole work split "
        "across the pool; boxes are checked once. ordered=True: per pair the run-by-run memmove of copy_boxes, "
        "pairs in parallel. Returns the bytes copied over all pairs.");
  m.def("validate_boxes",
        [](const BoxArray& boxes, int64_t src_nbytes, int64_t dst_nbytes) {
          return amoeba::validate_boxes(checked_rows(boxes), boxes.shape(0), src_nbytes, dst_nbytes);
        },
        py::arg("boxes"), py::arg("src_nbytes"), py::arg("dst_nbytes"),
        "Check every box against the buffer sizes; returns the bytes the boxes copy; raises ValueError otherwise.");
  m.def("set_copy_threads", &amoeba::set_copy_threads, py::arg("n"),
        "Default thread count of CPU copies: n > 0, or n <= 0 for the process's CPU affinity count.");
  m.def("copy_threads", &amoeba::default_copy_threads, "Threads a CPU copy uses when num_threads <= 0.");
  m.def("affinity_cpu_count", &amoeba::affinity_cpu_count, "CPUs in this process's affinity mask.");
  m.def("copy_pool_stats",
        [] {
          const amoeba::CopyPoolStats s = amoeba::copy_pool_stats();
          py::dict d;
          d["workers"] = s.workers;
          d["jobs"] = s.jobs;
          d["threads_started"] = s.threads_started;
          return d;
        },
        "The persistent copy pool: workers alive, parallel jobs run, workers ever started.");
  m.def("remap_boxes_ordered", &remap_boxes_ordered, py::arg("buf"), py::arg("buf_nbytes"), py::arg("boxes"),
        py::arg("min_remap_bytes") = int64_t(1) << 20,
        "In-place relayout of a host buffer in private anonymous memory with the result of copy_boxes(ordered=True), "
        "moving the whole pages of runs of at least min_remap_bytes with mremap instead of copying them (a remapped "
        "run's source afterwards holds other bytes; only when no two runs read the same bytes, else every run is "
        "copied). Returns the bytes remapped.");
  m.def("plan_ordered_phases", &plan_ordered_phases, py::arg("boxes"), py::arg("buf_nbytes"),
        py::arg("scratch_nbytes"), py::arg("launch_bytes") = int64_t(8) << 20,
        "Plan an in-place relayout (ordered boxes) as parallel phases: returns (kinds int8 (P,), starts int64 "
        "(P + 1,), rows int64 (M, BOX_FIELDS)); phase p copies rows[starts[p]:starts[p + 1]] buf -> buf "
        "(PHASE_DIRECT), buf -> scratch (PHASE_GATHER) or scratch -> buf (PHASE_SCATTER). Running the phases in "
        "order, each as one parallel copy, equals the run-by-run memmoves. scratch_nbytes: per buffer.");
  m.def("copy_phases", &copy_phases, py::arg("buf_bases"), py::arg("buf_nbytes"), py::arg("scratch_bases"),
        py::arg("scratch_nbytes"), py::arg("kinds"), py::arg("starts"), py::arg("rows"), py::arg("num_threads") = 0,
        "Run a phase table (plan_ordered_phases) on host buffers: buffer l with scratch scratch_bases[l], every "
        "phase one parallel copy over all buffers. The table is checked against the sizes first.");
  amoeba::register_elastic_bindings(m);
  amoeba::register_pull_bindings(m);
  amoeba::register_box_build_bindings(m);
#ifdef AMOEBA_WITH_CUDA
  m.attr("cuda_compiled") = true;
  amoeba::register_cuda_bindings(m);
#else
  m.attr("cuda_compiled") = false;
#endif
}
