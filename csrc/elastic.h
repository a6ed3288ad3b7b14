// Elastic memory regions: one reserved virtual address range whose physical memory is mapped for a prefix that
// grows and shrinks in granularity units, in place (no copy, the address never changes).
//
//   reservation  [base, base + reserved_bytes)          reserved once, never moves
//   mapped       [base, base + mapped_bytes)             physical memory behind it; resize() moves the end
//   leases       DLPack tensors over [base, base + n)    a shrink below the farthest lease is refused
//
// The physical side is a Backing: the CPU one (elastic.cpp) reserves with mmap(PROT_NONE, MAP_NORESERVE) and
// commits with mprotect + populate; the CUDA one (cuda/elastic_cuda.cpp) uses the driver's virtual memory
// management API (cuMemAddressReserve / cuMemCreate / cuMemMap). Nothing here includes CUDA headers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace amoeba {
namespace elastic {

// DLPack device type codes (kDLCPU, kDLCUDA), used as the region's device kind.
enum class DeviceKind : int32_t { kCpu = 1, kCuda = 2 };

// Base of the region's errors; surfaces in Python as amoeba_core._C.ElasticError (a RuntimeError).
class ElasticError : public std::runtime_error {
 public:
  explicit ElasticError(const std::string& what) : std::runtime_error(what) {}
};
// A request outside what the region allows: above the reservation, beyond the mapped prefix, a granularity that
// is not a multiple of the page / driver granularity, a closed region. Nothing was changed.
class LimitError : public ElasticError {
 public:
  using ElasticError::ElasticError;
};
// The OS or the driver refused to reserve, map or unmap (out of memory, unsupported). A failed map leaves the
// region exactly as it was.
class MapError : public ElasticError {
 public:
  using ElasticError::ElasticError;
};
// Live tensor views reach bytes that a shrink or close would unmap. Nothing was changed.
class LeaseError : public ElasticError {
 public:
  using ElasticError::ElasticError;
};

// Physical memory behind one reservation. Offsets and sizes passed in are multiples of granularity() inside the
// reservation (the Region checks). commit() maps [offset, offset + nbytes) and makes it resident, or throws
// MapError with that range unmapped again; release() unmaps it. The destructor frees the reservation; the Region
// releases the mapped prefix first.
class Backing {
 public:
  virtual ~Backing() = default;
  virtual void commit(uint64_t offset, uint64_t nbytes) = 0;
  virtual void release(uint64_t offset, uint64_t nbytes) = 0;

  uintptr_t base = 0;
  uint64_t reserved_bytes = 0;
  uint64_t granularity = 0;
  DeviceKind kind = DeviceKind::kCpu;
  int device = 0;   // device ordinal (0 on CPU)
  int fd = -1;      // memfd of a shareable CPU region, else -1
  bool shareable = false;
};

// granularity 0 = the default (OS page size / the driver's recommended granularity).
std::unique_ptr<Backing> make_cpu_backing(uint64_t max_bytes, uint64_t granularity, bool shareable);
// Defined in cuda/elastic_cuda.cpp when the CUDA engine is compiled; otherwise throws MapError.
std::unique_ptr<Backing> make_cuda_backing(uint64_t max_bytes, uint64_t granularity, bool shareable, int device);

// One elastic region. Thread-safe: lease deleters may run on any thread (torch frees storages wherever the last
// reference dies), so every state change happens under mu_. Always owned by a std::shared_ptr (leases hold one).
class Region : public std::enable_shared_from_this<Region> {
 public:
  explicit Region(std::unique_ptr<Backing> backing);
  // Releases the mapped prefix and the reservation. Runs when the last owner is gone: the Python object and every
  // lease. Errors here can only be reported on stderr.
  ~Region();

  // Maps or unmaps so that the mapped prefix is nbytes rounded up to the granularity; returns the new mapped
  // bytes. Throws LimitError (above the reservation), LeaseError (a lease reaches beyond the new end) or MapError;
  // on any throw the region is unchanged (except after an unmap the OS / driver refuses half way, not expected:
  // then mapped_bytes stays at the old size and the tail's content is undefined).
  uint64_t resize(uint64_t nbytes);
  // Releases everything now. Throws LeaseError while leases are outstanding (the region stays usable); a closed
  // region refuses every further resize and lease. Idempotent.
  void close();
  // A DLManagedTensor (kDLCPU / kDLCUDA, uint8, 1-D, nbytes long, at the base) whose deleter drops the lease it
  // holds. The caller owns the returned pointer until it hands it to a consumer (or calls its deleter).
  void* make_dlpack(uint64_t nbytes);

  uint64_t mapped_bytes() const;
  uint64_t num_leases() const;
  uint64_t lease_extent() const;  // farthest byte (exclusive) any live lease reaches; 0 without leases
  uint64_t num_leases_beyond(uint64_t nbytes) const;  // live leases that reach beyond byte nbytes
  bool closed() const;
  int fd() const;  // the memfd of a shareable CPU region while it is open, else -1

  // Fixed at construction, valid after close().
  const uintptr_t base;
  const uint64_t reserved_bytes;
  const uint64_t granularity;
  const DeviceKind kind;
  const int device;
  const bool shareable;

 private:
  friend void drop_lease(void* lease);
  void drop_lease_locked(uint64_t lease_id);
  void release_all_locked() noexcept;

  mutable std::mutex mu_;
  std::unique_ptr<Backing> backing_;  // null once closed
  uint64_t mapped_ = 0;
  bool closed_ = false;
  std::unordered_map<uint64_t, uint64_t> leases_;  // lease id -> extent in bytes from the base
  uint64_t next_lease_id_ = 0;
};

// Bytes mapped by every region of this process, per device kind: current and high-water mark.
struct MappedStats {
  uint64_t mapped_bytes;
  uint64_t peak_mapped_bytes;
};
MappedStats mapped_stats(DeviceKind kind);
// Sets the high-water mark of `kind` to the current mapped bytes (to measure the peak of one phase).
void reset_peak(DeviceKind kind);

// Test hook: the commit that follows `num_successful` more successful commits (of any region of this process)
// maps its range and then fails as if out of memory, so the rollback paths run on real mappings. -1 disables.
void inject_map_failure(int64_t num_successful);

}  // namespace elastic
}  // namespace amoeba
