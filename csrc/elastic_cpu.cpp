// CPU backing of elastic regions (see elastic.h): host memory whose resident size follows the mapped prefix.
//
//   reserve  mmap(PROT_NONE, MAP_NORESERVE): address space only, no memory and no commit charge
//   commit   mprotect(READ|WRITE) + populate (MADV_POPULATE_WRITE, else a write to every page), so the pages are
//            resident when resize() returns and an out-of-memory can only surface inside resize(), never later
//            on a first touch in the middle of a transfer
//   release  madvise(MADV_DONTNEED) + mprotect(PROT_NONE): the pages go back to the OS at once and the range
//            faults on any access again; a regrown range reads zeros
//
// shareable=true backs the reservation with a memfd (MAP_SHARED) that a later same-host transport can map from
// other processes: commit first allocates the file range with fallocate (a full tmpfs / memory cgroup then gives a
// clean error instead of SIGBUS on touch), release punches the range out of the file so its pages are freed too.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "elastic.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux >= 5.14
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

namespace amoeba {
namespace elastic {

namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string range_text(uint64_t offset, uint64_t nbytes) {
  return std::to_string(nbytes) + " bytes at offset " + std::to_string(offset);
}

// Kernels before 5.14 answer MADV_POPULATE_WRITE with EINVAL; then pages are touched instead (set once).
std::atomic<bool> g_populate_unsupported{false};

class CpuBacking final : public Backing {
 public:
  CpuBacking(uint64_t max_bytes, uint64_t requested_granularity, bool want_shareable) {
    const long page = sysconf(_SC_PAGESIZE);
    page_bytes_ = page > 0 ? static_cast<uint64_t>(page) : 4096;
    granularity = requested_granularity ? requested_granularity : page_bytes_;
    if (granularity % page_bytes_ != 0) {
      throw LimitError("elastic region (cpu): granularity " + std::to_string(granularity) +
                       " is not a multiple of the page size " + std::to_string(page_bytes_));
    }
    if (max_bytes == 0) throw LimitError("elastic region (cpu): max_bytes must be > 0");
    reserved_bytes = (max_bytes + granularity - 1) / granularity * granularity;
    kind = DeviceKind::kCpu;
    device = 0;
    shareable = want_shareable;
    void* addr = MAP_FAILED;
    if (shareable) {
      fd = memfd_create("amoeba-elastic", MFD_CLOEXEC);
      if (fd < 0) throw MapError("elastic region (cpu): memfd_create failed: " + errno_text(errno));
      if (ftruncate(fd, static_cast<off_t>(reserved_bytes)) != 0) {
        const int err = errno;
        ::close(fd);
        throw MapError("elastic region (cpu): ftruncate of the memfd to " + std::to_string(reserved_bytes) +
                       " bytes failed: " + errno_text(err));
      }
      addr = mmap(nullptr, reserved_bytes, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    } else {
      addr = mmap(nullptr, reserved_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (addr == MAP_FAILED) {
      const int err = errno;
      if (fd >= 0) ::close(fd);
      throw MapError("elastic region (cpu): reserving " + std::to_string(reserved_bytes) +
                     " bytes of address space failed: " + errno_text(err));
    }
    base = reinterpret_cast<uintptr_t>(addr);
  }

  ~CpuBacking() override {
    munmap(reinterpret_cast<void*>(base), reserved_bytes);
    if (fd >= 0) ::close(fd);
  }

  void commit(uint64_t offset, uint64_t nbytes) override {
    if (nbytes == 0) return;
    char* start = reinterpret_cast<char*>(base + offset);
    if (shareable) {
      if (fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(nbytes)) != 0) {
        fail(offset, nbytes, "fallocate of the memfd", errno);
      }
    }
    if (mprotect(start, nbytes, PROT_READ | PROT_WRITE) != 0) fail(offset, nbytes, "mprotect(READ|WRITE)", errno);
    populate(start, offset, nbytes);
  }

  void release(uint64_t offset, uint64_t nbytes) override {
    if (nbytes == 0) return;
    char* start = reinterpret_cast<char*>(base + offset);
    // DONTNEED drops the pages of a private mapping (and this mapping's page table entries of a shared one); the
    // hole punched below frees the memfd's pages themselves.
    if (madvise(start, nbytes, MADV_DONTNEED) != 0) {
      throw MapError("elastic region (cpu): madvise(DONTNEED) of " + range_text(offset, nbytes) +
                     " failed: " + errno_text(errno));
    }
    if (mprotect(start, nbytes, PROT_NONE) != 0) {
      throw MapError("elastic region (cpu): mprotect(NONE) of " + range_text(offset, nbytes) +
                     " failed: " + errno_text(errno));
    }
    if (shareable && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                               static_cast<off_t>(nbytes)) != 0) {
      throw MapError("elastic region (cpu): punching " + range_text(offset, nbytes) +
                     " out of the memfd failed: " + errno_text(errno));
    }
  }

 private:
  void populate(char* start, uint64_t offset, uint64_t nbytes) {
    if (!g_populate_unsupported.load()) {
      int rc;
      do {
        rc = madvise(start, nbytes, MADV_POPULATE_WRITE);
      } while (rc != 0 && errno == EINTR);
      if (rc == 0) return;
      if (errno != EINVAL) fail(offset, nbytes, "madvise(POPULATE_WRITE)", errno);
      g_populate_unsupported.store(true);
    }
    // Older kernels: one write per page. The range was unmapped before, so it holds zeros and writing a zero
    // keeps its contents. An out-of-memory here is the OOM killer's, not an error return: a limit of the fallback.
    volatile char* p = start;
    for (uint64_t i = 0; i < nbytes; i += page_bytes_) p[i] = 0;
  }

  // Undoes a partial commit of [offset, offset + nbytes) and throws MapError naming the step that failed.
  [[noreturn]] void fail(uint64_t offset, uint64_t nbytes, const char* step, int err) {
    char* start = reinterpret_cast<char*>(base + offset);
    madvise(start, nbytes, MADV_DONTNEED);
    mprotect(start, nbytes, PROT_NONE);
    if (shareable) {
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                static_cast<off_t>(nbytes));
    }
    throw MapError("elastic region (cpu): mapping " + range_text(offset, nbytes) + " (growing the mapped prefix " +
                   "from " + std::to_string(offset) + " to " + std::to_string(offset + nbytes) + " of " +
                   std::to_string(reserved_bytes) + " reserved bytes) failed in " + step + ": " + errno_text(err) +
                   "; region unchanged");
  }

  uint64_t page_bytes_ = 4096;
};

}  // namespace

std::unique_ptr<Backing> make_cpu_backing(uint64_t max_bytes, uint64_t granularity, bool shareable) {
  return std::make_unique<CpuBacking>(max_bytes, granularity, shareable);
}

}  // namespace elastic
}  // namespace amoeba
