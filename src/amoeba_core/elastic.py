"""Elastic memory: buffers that grow and shrink in place, so a KV cache can take over the memory a merge frees.

Design
  reserve max   Every buffer is an *elastic region*: one virtual address range reserved once for the largest size the
                caller allows (max_bytes, rounded up to the granularity). A reservation costs address space only.
  map a prefix  Physical memory is mapped for a prefix [0, mapped_bytes) that `resize` grows or shrinks in
                granularity units. The prefix never moves: no copy, data pointers stay valid, and the bytes of the
                kept prefix survive every resize bit for bit.
                  CPU   mmap(PROT_NONE, MAP_NORESERVE) reserves; mprotect + MADV_POPULATE_WRITE commits, so the pages
                        are resident when resize returns and an out-of-memory surfaces there, never at a first touch
                        in the middle of a transfer; MADV_DONTNEED + PROT_NONE releases, and resident memory drops at
                        once. A regrown tail reads zeros. Granularity: the page size (or a multiple of it).
                        shareable=True backs the range with a memfd (MAP_SHARED; fallocate to commit, a punched hole
                        to release) that a later same-host transport can map from other processes (`fd`).
                  CUDA  the driver's virtual memory management API: cuMemAddressReserve; one cuMemCreate handle per
                        granularity chunk (the driver's recommended granularity, 2 MiB on current GPUs) mapped with
                        cuMemMap + cuMemSetAccess; cuMemUnmap + cuMemRelease from the tail, after a device
                        synchronisation. Driver free memory follows the mapped size. A regrown tail is uninitialised.
  leases        `tensor()` returns a torch.uint8 view of the prefix with no copy (a DLPack capsule made by the
                extension). The view holds a *lease* on the region until torch frees its storage, i.e. until every
                tensor derived from it is gone. A shrink below the farthest lease raises ElasticLeaseError and
                changes nothing, so no view can ever reach unmapped memory.
  teardown      close() with live views raises ElasticLeaseError (the region stays open and usable). A region whose
                Python object is dropped while views are alive is freed by the last view (deferred, never under one).
  failures      A failing map (the OS or driver out of memory) unmaps what that call mapped and raises
                ElasticMapError naming the sizes; above the reservation: ElasticLimitError. ElasticKVPool.resize is
                all-or-nothing over all its regions.
  measured      The extension counts the bytes it maps per process (current and peak, CPU and CUDA apart):
                elastic_memory_stats(). Resident memory (VmRSS) and torch.cuda.mem_get_info follow them.

ElasticKVPool puts a paged KV cache (amoeba_core.kv.KVLayout) on such regions: one region per physical buffer, i.e.
per layer one raw buffer (vLLM) or two (SGLang's K and V token pools); every layout's tensors are views of them.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Union

import torch
import torch.utils.dlpack

from . import _C
from .errors import CapacityError, ElasticLeaseError, ElasticLimitError, ElasticMapError, ElasticMemoryError
from .layout.kv import KVLayout

DeviceLike = Union[str, torch.device]

_TRANSLATED = ((_C.ElasticLimitError, ElasticLimitError), (_C.ElasticLeaseError, ElasticLeaseError),
               (_C.ElasticMapError, ElasticMapError), (_C.ElasticError, ElasticMemoryError))


@contextlib.contextmanager
def _translated():
    """Re-raises the extension's elastic errors as amoeba_core.errors types (same message)."""
    try:
        yield
    except _C.ElasticError as e:
        for raw, typed in _TRANSLATED:
            if isinstance(e, raw):
                raise typed(str(e)) from None
        raise


def _resolve_device(device: DeviceLike) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is not None:
            return dev
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    raise ElasticLimitError(f"elastic memory supports 'cpu' and 'cuda' devices, got {str(device)!r}")


def _check_size(name: str, nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ElasticLimitError(f"{name} must be a non-negative int, got {nbytes!r}")
    return nbytes


def _round_up(nbytes: int, granularity: int) -> int:
    return -(-nbytes // granularity) * granularity


def elastic_memory_stats(device: DeviceLike = "cpu") -> dict:
    """Bytes mapped by this process's elastic regions on the device type of `device` (all CUDA devices together):
    {"mapped_bytes": now, "peak_mapped_bytes": high-water mark since start or reset_elastic_peak}."""
    return dict(_C.elastic_memory_stats(_resolve_device(device).type))


def reset_elastic_peak(device: DeviceLike = "cpu") -> None:
    """Sets the high-water mark of elastic_memory_stats(device) to the bytes mapped now (measure one phase)."""
    _C.elastic_reset_peak(_resolve_device(device).type)


class ElasticRegion:
    """A byte buffer of up to `max_bytes` whose mapped prefix grows and shrinks in place (see the module docstring).

    device: "cpu" or a CUDA device. granularity: bytes per mapping unit; None = the OS page size (CPU) or the
    driver's recommended granularity (CUDA); otherwise a multiple of the page size / of the driver's minimum.
    shareable: CPU: back the range with a memfd (`fd`); CUDA: request POSIX file descriptor handles (no export API
    yet). Nothing is mapped at first (mapped_bytes == 0).
    """

    def __init__(self, max_bytes: int, *, device: DeviceLike = "cpu", granularity: Optional[int] = None,
                 shareable: bool = False):
        _check_size("max_bytes", max_bytes)
        if granularity is not None:
            _check_size("granularity", granularity)
        self.device = _resolve_device(device)
        with _translated():
            self._region = _C.ElasticRegion(max_bytes, self.device.type, self.device.index or 0, granularity or 0,
                                            bool(shareable))

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def granularity(self) -> int:
        """Bytes per mapping unit: every mapped size is a multiple of it."""
        return self._region.granularity

    @property
    def max_bytes(self) -> int:
        """Bytes reserved: the max_bytes asked for, rounded up to the granularity."""
        return self._region.max_bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped now (the prefix [0, mapped_bytes) is readable and writable)."""
        return self._region.mapped_bytes

    @property
    def shareable(self) -> bool:
        return self._region.shareable

    @property
    def fd(self) -> Optional[int]:
        """The memfd behind a shareable CPU region while it is open (owned by the region: do not close it); None
        otherwise. Its offset x holds the region's byte x."""
        fd = self._region.fd
        return None if fd < 0 else fd

    @property
    def num_views(self) -> int:
        """Live views (leases): tensors from tensor() whose storage torch has not freed yet."""
        return self._region.num_leases

    @property
    def view_extent(self) -> int:
        """Farthest byte (exclusive) a live view reaches: the smallest size resize() accepts. 0 without views."""
        return self._region.lease_extent

    def views_beyond(self, nbytes: int) -> int:
        """Live views that reach beyond byte nbytes (those that block resize(nbytes))."""
        return self._region.num_leases_beyond(_check_size("nbytes", nbytes))

    @property
    def closed(self) -> bool:
        return self._region.closed

    # ---- verbs ------------------------------------------------------------------------------------------------
    def resize(self, nbytes: int) -> int:
        """Maps or unmaps so that the mapped prefix is nbytes rounded up to the granularity; returns it.

        Raises ElasticLimitError above max_bytes, ElasticLeaseError when a live view reaches beyond the new end,
        ElasticMapError when the OS / driver cannot map the memory; in every case the region is unchanged.
        """
        _check_size("nbytes", nbytes)
        with _translated():
            return self._region.resize(nbytes)

    def tensor(self, nbytes: Optional[int] = None) -> torch.Tensor:
        """A torch.uint8 tensor of shape (nbytes,) viewing bytes [0, nbytes) of the region, no copy (default: the
        whole mapped prefix). It holds a lease until it and every tensor derived from it are gone. Raises
        ElasticLimitError when nbytes exceeds mapped_bytes."""
        if nbytes is None:
            nbytes = self.mapped_bytes
        _check_size("nbytes", nbytes)
        with _translated():
            capsule = self._region.dlpack(nbytes)
        return torch.utils.dlpack.from_dlpack(capsule)

    def close(self) -> None:
        """Unmaps everything and frees the reservation now. Raises ElasticLeaseError while views are alive (the
        region stays open). Idempotent."""
        with _translated():
            self._region.close()

    def __enter__(self) -> "ElasticRegion":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except ElasticLeaseError:
            if exc_type is None:
                raise
            # Leaving on another exception: keep that one; the region is freed after its last view.

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"mapped={self.mapped_bytes}, views={self.num_views}"
        return (f"ElasticRegion(device={self.device}, max_bytes={self.max_bytes}, granularity={self.granularity}, "
                f"shareable={self.shareable}, {state})")


class ElasticKVPool:
    """A paged KV cache on elastic regions: per layer, layout.num_buffers regions (1 raw buffer per layer for vLLM's
    layouts, K and V token pools for SGLang), all of the same mapped size, resized together.

    Buffer bytes are kept across TP degrees: at degree d the mapped bytes hold capacity_blocks(d) blocks (including
    the layout's reserved blocks), and layers(num_blocks, d) views them in the layout's tensor shapes.

    max_buffer_bytes: bytes reserved per buffer (rounded up to the granularity). device, granularity, shareable:
    as for ElasticRegion. Nothing is mapped at first.

    handoff_slack_bytes: bytes of this rank's memory budget that the last retp handoff could not map because of
    page rounding (less than one granule per buffer); the next handoff counts them in, so repeated merges and
    splits never lose capacity to rounding.
    """

    def __init__(self, layout: KVLayout, max_buffer_bytes: int, *, device: DeviceLike = "cpu",
                 granularity: Optional[int] = None, shareable: bool = False):
        self.layout = layout
        made: List[ElasticRegion] = []
        try:
            for _ in range(layout.num_layers * layout.num_buffers):
                made.append(ElasticRegion(max_buffer_bytes, device=device, granularity=granularity,
                                          shareable=shareable))
        except BaseException:
            for region in made:
                region.close()
            raise
        nb = layout.num_buffers
        self.regions = tuple(tuple(made[i * nb:(i + 1) * nb]) for i in range(layout.num_layers))
        self.device = made[0].device
        self.handoff_slack_bytes = 0

    # ---- sizes ------------------------------------------------------------------------------------------------
    def _all(self) -> List[ElasticRegion]:
        return [r for layer in self.regions for r in layer]

    @property
    def granularity(self) -> int:
        return self.regions[0][0].granularity

    @property
    def max_buffer_bytes(self) -> int:
        """Bytes reserved per buffer."""
        return self.regions[0][0].max_bytes

    @property
    def mapped_buffer_bytes(self) -> int:
        """Bytes mapped per buffer (the same in every buffer)."""
        return self.regions[0][0].mapped_bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped by the whole pool: mapped_buffer_bytes * num_layers * num_buffers."""
        return sum(r.mapped_bytes for r in self._all())

    def _buffer_bytes_per_block(self, degree: int) -> int:
        self.layout.check_degree(degree)
        return self.layout.region_bytes(degree) * (2 // self.layout.num_buffers)

    def capacity_blocks(self, degree: int) -> int:
        """Blocks the mapped buffers hold at TP degree `degree` (KVLayout.num_blocks_for)."""
        self.layout.check_degree(degree)
        return self.layout.num_blocks_for(self.mapped_buffer_bytes, degree)

    def max_capacity_blocks(self, degree: int) -> int:
        """Blocks the buffers would hold at `degree` fully mapped."""
        self.layout.check_degree(degree)
        return self.layout.num_blocks_for(self.max_buffer_bytes, degree)

    def bytes_for_blocks(self, num_blocks: int, degree: int) -> int:
        """Buffer bytes that hold num_blocks blocks at `degree`, rounded up to the granularity (what resize maps)."""
        _check_size("num_blocks", num_blocks)
        return _round_up(num_blocks * self._buffer_bytes_per_block(degree), self.granularity)

    # ---- verbs ------------------------------------------------------------------------------------------------
    def resize(self, buffer_bytes: int) -> int:
        """Maps every buffer's prefix to buffer_bytes (rounded up to the granularity); returns mapped_buffer_bytes.

        All or nothing: a shrink below a live view (ElasticLeaseError) or above the maximum (ElasticLimitError) is
        refused before any region changes; when mapping fails part way (ElasticMapError), the regions already
        resized go back to their previous size.
        """
        _check_size("buffer_bytes", buffer_bytes)
        if buffer_bytes > self.max_buffer_bytes:
            raise ElasticLimitError(f"KV pool: cannot map {buffer_bytes} bytes per buffer: above the reserved maximum "
                                    f"of {self.max_buffer_bytes} (mapped {self.mapped_buffer_bytes}, unchanged)")
        target = _round_up(buffer_bytes, self.granularity)
        blocking = [(layer, b, r) for layer, regions in enumerate(self.regions) for b, r in enumerate(regions)
                    if r.view_extent > target]
        if blocking:
            views = sum(r.views_beyond(target) for _, _, r in blocking)
            farthest = max(r.view_extent for _, _, r in blocking)
            first = ", ".join(f"layer {layer} buffer {b}: {r.views_beyond(target)} view(s) to byte {r.view_extent}"
                              for layer, b, r in blocking[:3])
            raise ElasticLeaseError(f"KV pool: cannot shrink the buffers to {target} bytes: {views} live view(s) in "
                                    f"{len(blocking)} buffer(s) reach up to byte {farthest} ({first}"
                                    f"{', ...' if len(blocking) > 3 else ''}); drop them first. Pool unchanged at "
                                    f"{self.mapped_buffer_bytes} bytes per buffer")
        previous = self.mapped_buffer_bytes
        done: List[ElasticRegion] = []
        try:
            for region in self._all():
                region.resize(target)
                done.append(region)
        except ElasticMemoryError as failure:
            try:
                for region in reversed(done):
                    region.resize(previous)
            except ElasticMemoryError as rollback:
                raise ElasticMapError(f"KV pool: resizing to {target} bytes per buffer failed ({failure}) and "
                                      f"restoring {previous} bytes failed too ({rollback}); buffers now map "
                                      f"{[r.mapped_bytes for r in self._all()]} bytes") from None
            raise
        return target

    def buffers(self) -> List[List[torch.Tensor]]:
        """Per layer, the flat torch.uint8 views (mapped_buffer_bytes,) of its buffers, as KVLayout.buffers returns
        them. They lease the whole mapped prefix: drop them before shrinking."""
        return [[r.tensor() for r in layer] for layer in self.regions]

    def layers(self, num_blocks: int, degree: int) -> list:
        """Per layer the engine-facing KV tensor(s) of num_blocks blocks at TP degree `degree` (KVLayout.views):

          vllm_flash_attn  (2, num_blocks, block_size, H_local, head_dim)
          vllm_flashinfer  (num_blocks, 2, block_size, H_local, head_dim)
          sglang           (k, v), each (num_blocks * block_size, H_local, head_dim)

        in the layout's dtype (HND orders as transposed views of the physical tensor). They lease only the bytes
        they reach (bytes_for_blocks without the rounding), so the pool can shrink down to them while they live.
        Raises CapacityError when num_blocks exceeds capacity_blocks(degree).
        """
        per_block = self._buffer_bytes_per_block(degree)
        capacity = self.capacity_blocks(degree)
        _check_size("num_blocks", num_blocks)
        if num_blocks > capacity:
            raise CapacityError(f"KV pool: {num_blocks} blocks at TP degree {degree} need {num_blocks * per_block} "
                                f"bytes per buffer; {self.mapped_buffer_bytes} are mapped ({capacity} blocks; "
                                f"at most {self.max_capacity_blocks(degree)} when fully mapped)")
        nbytes = num_blocks * per_block
        return [self.layout.views([r.tensor(nbytes) for r in layer], num_blocks, degree) for layer in self.regions]

    def close(self) -> None:
        """Closes every region; raises ElasticLeaseError (closing none) while any view is alive."""
        live = [r for r in self._all() if r.num_views]
        if live:
            raise ElasticLeaseError(f"KV pool: cannot close: {sum(r.num_views for r in live)} live view(s) in "
                                    f"{len(live)} buffer(s); drop them first (the pool stays open)")
        for region in self._all():
            region.close()

    def __enter__(self) -> "ElasticKVPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except ElasticLeaseError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return (f"ElasticKVPool({self.layout.signature()}, device={self.device}, buffers="
                f"{self.layout.num_layers}x{self.layout.num_buffers}, mapped={self.mapped_buffer_bytes}/"
                f"{self.max_buffer_bytes} bytes per buffer, granularity={self.granularity})")
