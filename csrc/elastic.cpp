// Elastic regions (see elastic.h): resize logic, leases, DLPack views and the process-wide mapped-byte counters.
// Device-specific mapping lives in the backings (elastic_cpu.cpp, cuda/elastic_cuda.cpp).
#include "elastic.h"

#include <cstdio>
#include <string>

#include "dlpack_abi.h"

namespace amoeba {
namespace elastic {

namespace {

// ---- process-wide counters --------------------------------------------------------------------------------------

struct Counter {
  std::atomic<uint64_t> current{0};
  std::atomic<uint64_t> peak{0};
};
Counter g_counters[2];  // [0] CPU, [1] CUDA

Counter& counter(DeviceKind kind) { return g_counters[kind == DeviceKind::kCuda ? 1 : 0]; }

void count_mapped(DeviceKind kind, uint64_t nbytes) {
  Counter& c = counter(kind);
  const uint64_t now = c.current.fetch_add(nbytes) + nbytes;
  uint64_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
}

void count_unmapped(DeviceKind kind, uint64_t nbytes) { counter(kind).current.fetch_sub(nbytes); }

std::atomic<int64_t> g_fail_countdown{-1};

// True when this commit must fail (test hook, see inject_map_failure).
bool injected_failure_due() {
  int64_t left = g_fail_countdown.load();
  while (left >= 0) {
    if (g_fail_countdown.compare_exchange_weak(left, left - 1)) return left == 0;
  }
  return false;
}

std::string mib(uint64_t nbytes) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%llu bytes (%.2f MiB)", static_cast<unsigned long long>(nbytes),
                static_cast<double>(nbytes) / (1 << 20));
  return buf;
}

const char* kind_name(DeviceKind kind) { return kind == DeviceKind::kCuda ? "cuda" : "cpu"; }

// ---- leases -----------------------------------------------------------------------------------------------------

// One DLPack view of a region. Holds the region alive: a region whose Python object is gone is freed by the
// deleter of its last lease.
struct Lease {
  dlpack::ManagedTensor managed{};
  int64_t shape[1] = {0};
  std::shared_ptr<Region> region;
  uint64_t id = 0;
};

}  // namespace

void drop_lease(void* opaque) {
  auto* lease = static_cast<Lease*>(opaque);
  {
    std::lock_guard<std::mutex> lock(lease->region->mu_);
    lease->region->drop_lease_locked(lease->id);
  }
  delete lease;  // may drop the last reference to the region, which then releases its memory
}

namespace {
void lease_deleter(dlpack::ManagedTensor* self) { drop_lease(self->manager_ctx); }
}  // namespace

// ---- Region -----------------------------------------------------------------------------------------------------

Region::Region(std::unique_ptr<Backing> backing)
    : base(backing->base),
      reserved_bytes(backing->reserved_bytes),
      granularity(backing->granularity),
      kind(backing->kind),
      device(backing->device),
      shareable(backing->shareable) {
  backing_ = std::move(backing);
}

Region::~Region() {
  std::lock_guard<std::mutex> lock(mu_);
  release_all_locked();
}

void Region::release_all_locked() noexcept {
  if (!backing_) return;
  if (mapped_ > 0) {
    try {
      backing_->release(0, mapped_);
      count_unmapped(kind, mapped_);
      mapped_ = 0;
    } catch (const std::exception& e) {
      // Nothing can be raised from here (destructor / deleter); freeing the reservation below still unmaps it.
      std::fprintf(stderr, "amoeba elastic region: releasing %s failed: %s\n", mib(mapped_).c_str(), e.what());
      count_unmapped(kind, mapped_);
      mapped_ = 0;
    }
  }
  backing_.reset();  // frees the reservation (and the memfd)
  closed_ = true;
}

uint64_t Region::resize(uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw LimitError("elastic region: resize(" + std::to_string(nbytes) + ") on a closed region");
  if (nbytes > reserved_bytes) {
    throw LimitError("elastic region: cannot map " + mib(nbytes) + ": above the reserved maximum of " +
                     mib(reserved_bytes) + " (" + kind_name(kind) + ", " + std::to_string(mapped_) +
                     " bytes mapped, unchanged)");
  }
  const uint64_t target = (nbytes + granularity - 1) / granularity * granularity;
  if (target > mapped_) {
    const uint64_t grow = target - mapped_;
    const bool inject = injected_failure_due();
    backing_->commit(mapped_, grow);  // throws with nothing mapped by this call left behind
    if (inject) {  // fail after a real mapping, so the rollback path runs on it
      backing_->release(mapped_, grow);
      throw MapError("elastic region: mapping " + mib(grow) + " at offset " + std::to_string(mapped_) +
                     " failed: injected out-of-memory (test hook); region unchanged at " + mib(mapped_));
    }
    count_mapped(kind, grow);
  } else if (target < mapped_) {
    uint64_t blocking = 0, farthest = 0;
    for (const auto& kv : leases_) {
      if (kv.second > target) {
        ++blocking;
        if (kv.second > farthest) farthest = kv.second;
      }
    }
    if (blocking > 0) {
      throw LeaseError("elastic region: cannot shrink to " + mib(target) + ": " + std::to_string(blocking) +
                       " live tensor view(s) reach up to byte " + std::to_string(farthest) + " (" +
                       std::to_string(leases_.size()) + " view(s) in all); drop them first. Region unchanged at " +
                       mib(mapped_));
    }
    backing_->release(target, mapped_ - target);
    count_unmapped(kind, mapped_ - target);
  }
  mapped_ = target;
  return mapped_;
}

void Region::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  if (!leases_.empty()) {
    uint64_t farthest = 0;
    for (const auto& kv : leases_) farthest = kv.second > farthest ? kv.second : farthest;
    throw LeaseError("elastic region: cannot close: " + std::to_string(leases_.size()) +
                     " live tensor view(s) reach up to byte " + std::to_string(farthest) +
                     "; drop them first (the region stays open)");
  }
  release_all_locked();
}

void* Region::make_dlpack(uint64_t nbytes) {
  auto lease = std::make_unique<Lease>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw LimitError("elastic region: tensor view of a closed region");
    if (nbytes > mapped_) {
      throw LimitError("elastic region: a view of " + mib(nbytes) + " reaches beyond the mapped prefix of " +
                       mib(mapped_) + " (resize first)");
    }
    lease->id = next_lease_id_++;
    leases_.emplace(lease->id, nbytes);
  }
  lease->region = shared_from_this();
  lease->shape[0] = static_cast<int64_t>(nbytes);
  dlpack::Tensor& t = lease->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(base);
  t.device = {kind == DeviceKind::kCuda ? dlpack::kDLCUDA : dlpack::kDLCPU, device};
  t.ndim = 1;
  t.dtype = {dlpack::kDLUInt, 8, 1};
  t.shape = lease->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  lease->managed.manager_ctx = lease.get();
  lease->managed.deleter = &lease_deleter;
  return &lease.release()->managed;
}

void Region::drop_lease_locked(uint64_t lease_id) { leases_.erase(lease_id); }

uint64_t Region::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mapped_;
}

uint64_t Region::num_leases() const {
  std::lock_guard<std::mutex> lock(mu_);
  return leases_.size();
}

uint64_t Region::lease_extent() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t farthest = 0;
  for (const auto& kv : leases_) farthest = kv.second > farthest ? kv.second : farthest;
  return farthest;
}

uint64_t Region::num_leases_beyond(uint64_t nbytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t count = 0;
  for (const auto& kv : leases_) count += kv.second > nbytes ? 1 : 0;
  return count;
}

bool Region::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

int Region::fd() const {
  std::lock_guard<std::mutex> lock(mu_);
  return backing_ ? backing_->fd : -1;
}

// ---- counters and test hook -------------------------------------------------------------------------------------

MappedStats mapped_stats(DeviceKind kind) {
  const Counter& c = counter(kind);
  return {c.current.load(), c.peak.load()};
}

void reset_peak(DeviceKind kind) {
  Counter& c = counter(kind);
  c.peak.store(c.current.load());
}

void inject_map_failure(int64_t num_successful) { g_fail_countdown.store(num_successful < 0 ? -1 : num_successful); }

#ifndef AMOEBA_WITH_CUDA
std::unique_ptr<Backing> make_cuda_backing(uint64_t, uint64_t, bool, int) {
  throw MapError("elastic region: device 'cuda' needs the CUDA engine, and this build of amoeba_core._C has none "
                 "(rebuild with nvcc on PATH, AMOEBA_CUDA=ON)");
}
#endif

}  // namespace elastic
}  // namespace amoeba
