// pybind11 bindings of elastic regions (called from PYBIND11_MODULE in bindings.cpp). Tensor views cross the
// boundary as DLPack capsules (no libtorch); amoeba_core.elastic turns them into torch tensors.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <string>

#include "dlpack_abi.h"
#include "elastic.h"

namespace py = pybind11;

namespace amoeba {

namespace {

using elastic::DeviceKind;
using elastic::Region;

// Destructor of a capsule nobody consumed: a consumer renames the capsule ("used_dltensor") and owns the tensor,
// so only a capsule still named "dltensor" frees its lease here.
void capsule_destructor(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) return;
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}

py::object dlpack_capsule(Region& region, uint64_t nbytes) {
  auto* managed = static_cast<dlpack::ManagedTensor*>(region.make_dlpack(nbytes));
  PyObject* capsule = PyCapsule_New(managed, dlpack::kCapsuleName, &capsule_destructor);
  if (capsule == nullptr) {
    managed->deleter(managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

std::shared_ptr<Region> make_region(uint64_t max_bytes, const std::string& device_type, int device_index,
                                    uint64_t granularity, bool shareable) {
  std::unique_ptr<elastic::Backing> backing;
  {
    py::gil_scoped_release release;  // a CUDA reservation may create the device context (slow)
    if (device_type == "cpu") {
      backing = elastic::make_cpu_backing(max_bytes, granularity, shareable);
    } else if (device_type == "cuda") {
      backing = elastic::make_cuda_backing(max_bytes, granularity, shareable, device_index);
    } else {
      throw elastic::LimitError("elastic region: device type '" + device_type + "' is not 'cpu' or 'cuda'");
    }
  }
  return std::make_shared<Region>(std::move(backing));
}

py::dict stats_dict(DeviceKind kind) {
  const elastic::MappedStats s = elastic::mapped_stats(kind);
  py::dict d;
  d["mapped_bytes"] = s.mapped_bytes;
  d["peak_mapped_bytes"] = s.peak_mapped_bytes;
  return d;
}

DeviceKind kind_of(const std::string& device_type) {
  if (device_type == "cpu") return DeviceKind::kCpu;
  if (device_type == "cuda") return DeviceKind::kCuda;
  throw elastic::LimitError("elastic memory stats: device type '" + device_type + "' is not 'cpu' or 'cuda'");
}

}  // namespace

void register_elastic_bindings(py::module_& m) {
  // Derived classes after their base: pybind11 tries translators in reverse order of registration.
  auto& base_error = py::register_exception<elastic::ElasticError>(m, "ElasticError", PyExc_RuntimeError);
  py::register_exception<elastic::LimitError>(m, "ElasticLimitError", base_error.ptr());
  py::register_exception<elastic::MapError>(m, "ElasticMapError", base_error.ptr());
  py::register_exception<elastic::LeaseError>(m, "ElasticLeaseError", base_error.ptr());

  py::class_<Region, std::shared_ptr<Region>>(
      m, "ElasticRegion",
      "A reserved virtual address range whose mapped prefix grows and shrinks in place (see csrc/elastic.h). "
      "Use amoeba_core.elastic.ElasticRegion, which wraps this with torch views and typed errors.")
      .def(py::init(&make_region), py::arg("max_bytes"), py::arg("device_type") = "cpu",
           py::arg("device_index") = 0, py::arg("granularity") = 0, py::arg("shareable") = false)
      .def("resize", &Region::resize, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>(),
           "Map or unmap so that the mapped prefix is nbytes rounded up to the granularity; returns it.")
      .def("close", &Region::close, py::call_guard<py::gil_scoped_release>(),
           "Release the memory and the reservation now; refused while views are alive.")
      .def("dlpack", &dlpack_capsule, py::arg("nbytes"),
           "A DLPack capsule ('dltensor': uint8, 1-D, nbytes long, at the base) that holds a lease until freed.")
      .def_readonly("granularity", &Region::granularity)
      .def_readonly("max_bytes", &Region::reserved_bytes)
      .def_readonly("device_index", &Region::device)
      .def_readonly("shareable", &Region::shareable)
      .def_property_readonly("device_type",
                             [](const Region& r) { return r.kind == DeviceKind::kCuda ? "cuda" : "cpu"; })
      .def_property_readonly("mapped_bytes", &Region::mapped_bytes)
      .def_property_readonly("num_leases", &Region::num_leases)
      .def_property_readonly("lease_extent", &Region::lease_extent)
      .def("num_leases_beyond", &Region::num_leases_beyond, py::arg("nbytes"))
      .def_property_readonly("closed", &Region::closed)
      .def_property_readonly("fd", &Region::fd);

  m.def("elastic_memory_stats", [](const std::string& device_type) { return stats_dict(kind_of(device_type)); },
        py::arg("device_type"),
        "Bytes mapped by the elastic regions of this process on 'cpu' or 'cuda': {'mapped_bytes', "
        "'peak_mapped_bytes'}.");
  m.def("elastic_reset_peak", [](const std::string& device_type) { elastic::reset_peak(kind_of(device_type)); },
        py::arg("device_type"), "Set the high-water mark of 'cpu' or 'cuda' to the bytes mapped now.");
  m.def("_elastic_inject_map_failure", &elastic::inject_map_failure, py::arg("num_successful"),
        "Test hook: the commit after num_successful more successful ones maps its range and then fails as out of "
        "memory (rolled back). -1 disables.");
}

}  // namespace amoeba
