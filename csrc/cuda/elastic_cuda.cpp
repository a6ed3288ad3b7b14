// CUDA backing of elastic regions (see ../elastic.h) on the driver's virtual memory management (VMM) API.
//
//   reserve  cuMemAddressReserve(reserved_bytes, alignment = granularity): device address space, no memory
//   commit   per granularity-sized chunk: cuMemCreate (one physical allocation handle) + cuMemMap at its offset;
//            then one cuMemSetAccess(READ|WRITE) over the whole grown range
//   release  per chunk from the tail: cuMemUnmap + cuMemRelease (the memory goes back to the driver at once)
//
// The same scheme as PyTorch's expandable segments (c10/cuda/CUDACachingAllocator.cpp, ExpandableSegment: reserve
// a large range once, map handles at its end, set access on the mapped range, synchronise before unmapping), vLLM's
// CuMemAllocator (csrc/cumem_allocator.cpp: cuMemCreate + cuMemMap + cuMemSetAccess for the device, pinned
// device-location properties) and kvcached (csrc/ftensor.cpp, csrc/page.cpp: the KV range reserved up front, one
// handle per page mapped on demand). Unlike vLLM's module, this one never links libcuda: driver entry points come
// from the CUDA runtime (cudaGetDriverEntryPointByVersion), so amoeba_core._C links only the static runtime and
// imports on machines without a driver; the first CUDA region then fails with a typed error instead.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "../elastic.h"

namespace amoeba {
namespace elastic {

namespace {

// ABI version asked for every symbol: the CUDA 12.0 ABI of the VMM calls (their _v10020 signatures).
constexpr unsigned int kDriverAbiVersion = 12000;

struct DriverApi {
  PFN_cuGetErrorName_v6000 get_error_name = nullptr;
  PFN_cuDeviceGet_v2000 device_get = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 get_granularity = nullptr;
  PFN_cuMemAddressReserve_v10020 address_reserve = nullptr;
  PFN_cuMemAddressFree_v10020 address_free = nullptr;
  PFN_cuMemCreate_v10020 create = nullptr;
  PFN_cuMemRelease_v10020 release = nullptr;
  PFN_cuMemMap_v10020 map = nullptr;
  PFN_cuMemUnmap_v10020 unmap = nullptr;
  PFN_cuMemSetAccess_v10020 set_access = nullptr;
};

std::string runtime_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

template <typename Fn>
void load_symbol(const char* symbol, Fn* fn) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &ptr, kDriverAbiVersion, cudaEnableDefault,
                                                           &status);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw MapError(std::string("elastic region (cuda): cudaGetDriverEntryPointByVersion(") + symbol +
                   ") failed: " + runtime_error_text(err) + " (no CUDA driver?)");
  }
  if (status != cudaDriverEntryPointSuccess || ptr == nullptr) {
    throw MapError(std::string("elastic region (cuda): the CUDA driver has no entry point ") + symbol +
                   (status == cudaDriverEntryPointVersionNotSufficent ? " (driver too old)" : " (not found)"));
  }
  *fn = reinterpret_cast<Fn>(ptr);
}

// Loaded once per process; a failed load is retried by the next region (the error is thrown to each caller).
const DriverApi& driver() {
  static std::mutex mu;
  static DriverApi api;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mu);
  if (!loaded) {
    DriverApi a;
    load_symbol("cuGetErrorName", &a.get_error_name);
    load_symbol("cuDeviceGet", &a.device_get);
    load_symbol("cuMemGetAllocationGranularity", &a.get_granularity);
    load_symbol("cuMemAddressReserve", &a.address_reserve);
    load_symbol("cuMemAddressFree", &a.address_free);
    load_symbol("cuMemCreate", &a.create);
    load_symbol("cuMemRelease", &a.release);
    load_symbol("cuMemMap", &a.map);
    load_symbol("cuMemUnmap", &a.unmap);
    load_symbol("cuMemSetAccess", &a.set_access);
    api = a;
    loaded = true;
  }
  return api;
}

std::string result_name(CUresult res) {
  const char* name = nullptr;
  if (driver().get_error_name(res, &name) != CUDA_SUCCESS || name == nullptr) {
    return "CUresult " + std::to_string(static_cast<int>(res));
  }
  return name;
}

// Throws MapError naming the driver call and its CUresult unless res is CUDA_SUCCESS.
void check(CUresult res, const char* call, const std::string& context) {
  if (res != CUDA_SUCCESS) {
    throw MapError(std::string("elastic region (cuda): ") + call + " failed with " + result_name(res) + " (" +
                   context + ")");
  }
}

void check_runtime(cudaError_t err, const char* call, int device) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw MapError(std::string("elastic region (cuda): ") + call + " for device " + std::to_string(device) +
                   " failed: " + runtime_error_text(err));
  }
}

// Makes `device` current (its primary context, which the runtime creates on cudaSetDevice) for the driver calls
// of one operation, and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_runtime(cudaGetDevice(&previous_), "cudaGetDevice", device);
    if (previous_ != device) check_runtime(cudaSetDevice(device), "cudaSetDevice", device);
    // cudaSetDevice initialises the primary context since CUDA 12; cudaFree(0) forces it on any version.
    check_runtime(cudaFree(nullptr), "cudaFree(0) (context creation)", device);
    switched_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

std::string range_text(uint64_t offset, uint64_t nbytes) {
  return std::to_string(nbytes) + " bytes at offset " + std::to_string(offset);
}

class CudaBacking final : public Backing {
 public:
  CudaBacking(uint64_t max_bytes, uint64_t requested_granularity, bool want_shareable, int ordinal) {
    kind = DeviceKind::kCuda;
    device = ordinal;
    shareable = want_shareable;
    if (max_bytes == 0) throw LimitError("elastic region (cuda): max_bytes must be > 0");
    int count = 0;
    const cudaError_t count_err = cudaGetDeviceCount(&count);
    if (count_err != cudaSuccess) {
      (void)cudaGetLastError();
      throw MapError("elastic region (cuda): no usable CUDA device: " + runtime_error_text(count_err));
    }
    if (ordinal < 0 || ordinal >= count) {
      throw LimitError("elastic region (cuda): device " + std::to_string(ordinal) + " does not exist (" +
                       std::to_string(count) + " visible)");
    }
    const DriverApi& api = driver();
    DeviceGuard guard(device);
    CUdevice cu_device = 0;
    check(api.device_get(&cu_device, ordinal), "cuDeviceGet", "ordinal " + std::to_string(ordinal));

    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = cu_device;
    // A file descriptor handle type lets a later same-host transport export the chunks (no export API yet).
    prop_.requestedHandleTypes = shareable ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;

    size_t minimum = 0, recommended = 0;
    check(api.get_granularity(&minimum, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          "cuMemGetAllocationGranularity(MINIMUM)", "device " + std::to_string(ordinal));
    check(api.get_granularity(&recommended, &prop_, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
          "cuMemGetAllocationGranularity(RECOMMENDED)", "device " + std::to_string(ordinal));
    granularity = requested_granularity ? requested_granularity : recommended;
    if (minimum == 0 || granularity % minimum != 0) {
      throw LimitError("elastic region (cuda): granularity " + std::to_string(granularity) +
                       " is not a multiple of the driver's minimum granularity " + std::to_string(minimum) +
                       " (recommended " + std::to_string(recommended) + ")");
    }
    reserved_bytes = (max_bytes + granularity - 1) / granularity * granularity;
    CUdeviceptr ptr = 0;
    check(api.address_reserve(&ptr, reserved_bytes, granularity, 0, 0), "cuMemAddressReserve",
          std::to_string(reserved_bytes) + " bytes, device " + std::to_string(ordinal));
    base = static_cast<uintptr_t>(ptr);
  }

  ~CudaBacking() override {
    // The Region released every chunk before; free anything left (a failed release) and the address range.
    const DriverApi& api = driver();  // loaded by the constructor: cannot throw here
    int previous = device;
    if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) (void)cudaGetLastError();
    for (size_t i = handles_.size(); i-- > 0;) {
      (void)api.unmap(base + i * granularity, granularity);
      (void)api.release(handles_[i]);
    }
    const CUresult res = api.address_free(base, reserved_bytes);
    if (res != CUDA_SUCCESS) {
      std::fprintf(stderr, "amoeba elastic region (cuda): cuMemAddressFree failed with %s\n",
                   result_name(res).c_str());
    }
    if (previous != device && cudaSetDevice(previous) != cudaSuccess) (void)cudaGetLastError();
  }

  void commit(uint64_t offset, uint64_t nbytes) override {
    if (nbytes == 0) return;
    const DriverApi& api = driver();
    DeviceGuard guard(device);
    const size_t first = handles_.size();  // chunks [0, first) are the current prefix
    if (offset != first * granularity) {  // only after a release that failed half way
      throw MapError("elastic region (cuda): the mapped prefix is " + std::to_string(first * granularity) +
                     " bytes after an earlier failed release, not " + std::to_string(offset) + "; region unusable");
    }
    const size_t count = nbytes / granularity;
    try {
      for (size_t i = 0; i < count; ++i) {
        const uint64_t chunk_offset = offset + i * granularity;
        CUmemGenericAllocationHandle handle = 0;
        check(api.create(&handle, granularity, &prop_, 0), "cuMemCreate",
              grow_context(offset, nbytes, chunk_offset));
        const CUresult mapped = api.map(base + chunk_offset, granularity, 0, handle, 0);
        if (mapped != CUDA_SUCCESS) {
          (void)api.release(handle);
          check(mapped, "cuMemMap", grow_context(offset, nbytes, chunk_offset));
        }
        handles_.push_back(handle);
      }
      check(api.set_access(base + offset, nbytes, &access_, 1), "cuMemSetAccess",
            grow_context(offset, nbytes, offset));
    } catch (...) {
      // Roll back every chunk this call mapped: the region is exactly as it was.
      release_chunks_from(first);
      throw;
    }
  }

  void release(uint64_t offset, uint64_t nbytes) override {
    if (nbytes == 0) return;
    DeviceGuard guard(device);
    // Kernels still in flight may read the tail: wait for the device before unmapping (as ExpandableSegment does
    // with its stream). A resize is rare; a full device synchronisation keeps every stream safe.
    check_runtime(cudaDeviceSynchronize(), "cudaDeviceSynchronize before unmapping", device);
    const size_t keep = offset / granularity;
    const DriverApi& api = driver();
    while (handles_.size() > keep) {
      const size_t i = handles_.size() - 1;
      const uint64_t chunk_offset = i * granularity;
      check(api.unmap(base + chunk_offset, granularity), "cuMemUnmap",
            range_text(chunk_offset, granularity) + " while releasing " + range_text(offset, nbytes));
      check(api.release(handles_[i]), "cuMemRelease",
            range_text(chunk_offset, granularity) + " while releasing " + range_text(offset, nbytes));
      handles_.pop_back();
    }
  }

 private:
  std::string grow_context(uint64_t offset, uint64_t nbytes, uint64_t chunk_offset) const {
    return "chunk of " + std::to_string(granularity) + " bytes at offset " + std::to_string(chunk_offset) +
           " while growing the mapped prefix from " + std::to_string(offset) + " to " +
           std::to_string(offset + nbytes) + " of " + std::to_string(reserved_bytes) + " reserved bytes on device " +
           std::to_string(device) + "; region unchanged";
  }

  // Best-effort unmap + release of chunks [first, end) (rollback: the first error is already being thrown).
  void release_chunks_from(size_t first) noexcept {
    const DriverApi& api = driver();
    while (handles_.size() > first) {
      const size_t i = handles_.size() - 1;
      (void)api.unmap(base + i * granularity, granularity);
      (void)api.release(handles_[i]);
      handles_.pop_back();
    }
  }

  CUmemAllocationProp prop_ = {};
  CUmemAccessDesc access_ = {};
  std::vector<CUmemGenericAllocationHandle> handles_;  // handles_[i] backs [i * gran, (i + 1) * gran)
};

}  // namespace

std::unique_ptr<Backing> make_cuda_backing(uint64_t max_bytes, uint64_t granularity, bool shareable, int device) {
  return std::make_unique<CudaBacking>(max_bytes, granularity, shareable, device);
}

}  // namespace elastic
}  // namespace amoeba
