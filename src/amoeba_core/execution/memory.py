"""Accounting of the extra memory a transformation holds beyond the old and new tensors themselves."""
from __future__ import annotations

import torch


class ExtraMemoryTracker:
    """Tracks bytes the library holds on top of the steady state.

    A new tensor allocated while its old tensor is still alive counts until the old one is released; scratch
    buffers count while they exist. `peak` is the high-water mark. On CUDA, `device_peak()` also reports the
    caching allocator's own high-water mark since `start()`, an independent measure.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.current = 0
        self.peak = 0
        self._device_base = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_base = torch.cuda.memory_allocated(self.device)

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        self.current -= nbytes

    def device_peak(self):
        """Peak bytes above the allocation at start() per the CUDA caching allocator (None on CPU)."""
        if self._device_base is None:
            return None
        return torch.cuda.max_memory_allocated(self.device) - self._device_base
