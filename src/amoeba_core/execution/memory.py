"""Extra memory of one transformation on one rank: the library's bookkeeping beside independent measurements.

Bookkeeping counts what the library allocates on top of the steady state (scratch, a new shard alive beside its
old one, pinned host staging, the executor's index tables). Measurements do not trust it; like the bookkeeping they
report what a phase held above max(before, after) (a split's larger shards are the new steady state, not extra):

  CPU tensors   the process's resident-memory high-water mark (VmHWM in /proc/self/status) minus the resident
                memory at the start. start() and every phase boundary reset the high-water mark to the current
                resident memory by writing 5 to /proc/self/clear_refs: a process-wide side effect (the process's
                own earlier peak is forgotten), and the only way Linux offers to measure a peak of an interval.
                Resident memory counts pages, not allocations: bytes the allocator reuses from memory the process
                freed earlier (and kept resident) do not show, so on CPU the figure can be below the bookkeeping.
  CUDA tensors  the caching allocator's allocated bytes, as deltas from the start, without resetting the
                engine's statistics: sampled after every allocation the library makes, and exact whenever this
                call raised the allocator's all-time peak; plus the driver's free memory (cudaMemGetInfo),
                sampled alike, which also sees memory allocated outside the caching allocator.
"""
from __future__ import annotations

import ctypes
from typing import Dict, Optional

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_bytes(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def return_freed_memory(device: torch.device) -> None:
    """Give memory the process freed back to the OS (glibc malloc_trim) or the CUDA driver (the caching
    allocator's unused blocks: torch.cuda.empty_cache, which affects the whole process), so that an elastic pool can
    map it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Tracks and measures the extra memory of one retp call on one rank, per phase ("plan", "prepare",
    "weights", "kv"): created when the call starts; attach_device() once the tensors' device is known.

    measure: False skips every measurement (bookkeeping only)
    """

    def __init__(self, measure: bool = True):
        self.device: Optional[torch.device] = None
        self.measure = measure
        self.current = 0
        self.peak = 0
        self.phase_peaks: Dict[str, int] = {}
        self.measured: Dict[str, Optional[int]] = {}
        self.host_measured: Dict[str, Optional[int]] = {}
        self.driver_measured: Dict[str, Optional[int]] = {}
        self._phase: Optional[str] = None
        self._rss_base: Optional[int] = None
        self._cuda = False
        self.method = "none"
        self._rss_peak_abs = 0
        if measure and _reset_rss_peak():
            self._rss_base = self._rss_peak_abs = _status_bytes("VmRSS")
            self.method = "rss_hwm"

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def add(self, nbytes: int) -> None:
        self.current += int(nbytes)
        self.peak = max(self.peak, self.current)
        if self._phase is not None:
            self.phase_peaks[self._phase] = max(self.phase_peaks.get(self._phase, 0), self.current)
        self.sample()

    def sub(self, nbytes: int) -> None:
        self.current -= int(nbytes)

    # ---- measurement -----------------------------------------------------------------------------------------
    def attach_device(self, device: torch.device) -> None:
        """Start measuring `device` too (CUDA: allocator and driver deltas from now)."""
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda" and self.measure
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._alloc_base = torch.cuda.memory_allocated(self.device)
            self._alloc_prior_max = torch.cuda.max_memory_allocated(self.device)
            self._free_base = torch.cuda.mem_get_info(self.device)[0]
            self._alloc_max = self._phase_alloc_max = self._alloc_base
            self._free_min = self._phase_free_min = self._free_base
            self.method = "cuda_allocator_sampled"

    def sample(self) -> None:
        if self._cuda:
            a = torch.cuda.memory_allocated(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            self._alloc_max, self._phase_alloc_max = max(self._alloc_max, a), max(self._phase_alloc_max, a)
            self._free_min, self._phase_free_min = min(self._free_min, free), min(self._phase_free_min, free)

    def begin_phase(self, name: str) -> None:
        """Close the current phase's measurement and start `name`'s."""
        self.end_phase()
        self._phase = name
        self.phase_peaks[name] = self.current

    def end_phase(self) -> None:
        name = self._phase
        if name is None:
            return
        self._phase = None
        if not self.measure:
            return
        host = None
        if self._rss_base is not None:
            hwm = _status_bytes("VmHWM")
            host = None if hwm is None else max(0, hwm - self._rss_base)
            if hwm is not None:
                self._rss_peak_abs = max(self._rss_peak_abs, hwm)
            _reset_rss_peak()
        self.host_measured[name] = host
        if self._cuda:
            self.sample()
            self.measured[name] = self._phase_alloc_max - self._alloc_base
            self.driver_measured[name] = self._free_base - self._phase_free_min
            self._phase_alloc_max, self._phase_free_min = torch.cuda.memory_allocated(self.device), \
                torch.cuda.mem_get_info(self.device)[0]
        elif self.device is None or self.device.type == "cpu":
            self.measured[name] = host

    def report(self, steady_growth_bytes: int = 0, trim: bool = False) -> dict:
        """Figures for RetpStats (bytes; None where not measured). Call once the call's own buffers are freed;
        trim: give freed memory back first (return_freed_memory), so that "after" is what the process holds, not
        what its allocator kept (an elastic pool's invariant compares the peak with it).

        Measurements are peaks above max(before, after), so that a split's larger shards (the new steady state) do
        not count as extra memory. The allocator's "after" is exact; resident memory's is not (freed buffers often
        stay resident), so its steady growth is min(steady_growth_bytes, how much resident memory grew), where
        steady_growth_bytes is what the plan makes permanent (new shards larger than the old ones)."""
        self.end_phase()
        if trim and self.device is not None:
            return_freed_memory(self.device)
        rss_end = _status_bytes("VmRSS") if self._rss_base is not None else None
        host_growth = 0 if rss_end is None else \
            max(0, min(int(steady_growth_bytes), rss_end - self._rss_base))
        if self._cuda:
            torch.cuda.synchronize(self.device)
            growth = max(0, torch.cuda.memory_allocated(self.device) - self._alloc_base)
            driver_growth = max(0, self._free_base - torch.cuda.mem_get_info(self.device)[0])
        else:
            growth = driver_growth = host_growth

        def above(d, base):
            out = {k: None if v is None else max(0, v - base) for k, v in d.items()}
            vals = [v for v in out.values() if v is not None]
            return out, (max(vals) if vals else None)

        measured_phases, measured = above(self.measured, growth)
        _, host = above(self.host_measured, host_growth)
        _, driver = above(self.driver_measured, driver_growth)
        if self._cuda and torch.cuda.max_memory_allocated(self.device) > self._alloc_prior_max:
            # This call raised the allocator's all-time peak, so that peak was reached during the call: exact.
            measured = max(0, torch.cuda.max_memory_allocated(self.device) - self._alloc_base - growth)
            self.method = "cuda_allocator_peak"
        absolute = {}
        if self._cuda:
            total = torch.cuda.mem_get_info(self.device)[1]
            absolute = {"before": total - self._free_base, "peak": total - self._free_min,
                        "after": total - torch.cuda.mem_get_info(self.device)[0]}
        elif rss_end is not None:
            absolute = {"before": self._rss_base, "peak": max(self._rss_peak_abs, rss_end), "after": rss_end}
        return {"tracked": self.peak, "tracked_phases": dict(self.phase_peaks), "measured": measured,
                "measured_phases": measured_phases, "host": host, "driver": driver, "method": self.method,
                "absolute": absolute}
