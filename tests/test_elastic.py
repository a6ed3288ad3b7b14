"""Elastic memory regions and the elastic KV pool, on real mappings.

CPU tests check the process's resident memory (VmRSS), the kernel's view of the mapping (/proc/self/maps) and the
bytes themselves; GPU tests (marked gpu) check driver free memory (torch.cuda.mem_get_info) the same way.
"""
import gc
import mmap
import os
import threading

import pytest
import torch

import amoeba_core as A
from amoeba_core import _C
from amoeba_core.elastic import ElasticKVPool, ElasticRegion, elastic_memory_stats, reset_elastic_peak
from amoeba_core.kv import KVLayout

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGESIZE")
RSS_TOLERANCE = 3 * MiB  # page tables, the interpreter's own allocations between two readings
LAYOUTS = [("vllm_flash_attn", "NHD"), ("vllm_flash_attn", "HND"), ("vllm_flashinfer", "NHD"),
           ("vllm_flashinfer", "HND"), ("sglang", "NHD")]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def protections(start: int, end: int):
    """[(first, last, perms)] of the kernel's mappings that intersect [start, end), clipped to it."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi > start and lo < end:
                out.append((max(lo, start) - start, min(hi, end) - start, perms))
    return out


def random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.fixture(autouse=True)
def no_injected_failure():
    yield
    _C._elastic_inject_map_failure(-1)


# ---------------------------------------------------------------------------------------------------------------
# One region


@pytest.mark.parametrize("shareable", [False, True], ids=["anonymous", "memfd"])
def test_resident_memory_follows_the_mapped_size(shareable):
    sizes = [48 * MiB, 16 * MiB, 64 * MiB, 0, 40 * MiB, 8 * MiB]
    with ElasticRegion(64 * MiB, shareable=shareable) as region:
        gc.collect()
        base_rss = rss_bytes()
        base_mapped = elastic_memory_stats()["mapped_bytes"]
        assert region.mapped_bytes == 0
        for size in sizes:
            assert region.resize(size) == size == region.mapped_bytes
            assert abs(rss_bytes() - base_rss - size) <= RSS_TOLERANCE, f"after resize({size >> 20} MiB)"
            assert elastic_memory_stats()["mapped_bytes"] - base_mapped == size
        region.resize(0)
    assert abs(rss_bytes() - base_rss) <= RSS_TOLERANCE


@pytest.mark.parametrize("shareable", [False, True], ids=["anonymous", "memfd"])
def test_kept_prefix_survives_every_resize_at_a_fixed_address(shareable):
    """Grow/shrink/grow: the kept prefix keeps its bytes, a regrown tail reads zeros, the address never moves."""
    region = ElasticRegion(24 * MiB, shareable=shareable)
    expected = torch.empty(0, dtype=torch.uint8)
    address = None
    for step, size in enumerate([8 * MiB, 3 * MiB + 5 * PAGE, 24 * MiB, 1 * MiB, 0, 20 * MiB, 2 * PAGE]):
        region.resize(size)
        view = region.tensor()
        assert view.numel() == size
        if size:  # torch reports data_ptr 0 for an empty tensor
            address = address or view.data_ptr()
            assert view.data_ptr() == address
        kept = min(size, expected.numel())
        assert torch.equal(view[:kept], expected[:kept]), f"step {step}: kept prefix changed"
        assert not view[kept:].any(), f"step {step}: regrown tail is not zero"
        view[kept:] = random_bytes(size - kept, seed=step)  # new bytes for the next steps to check
        expected = view.clone()
        del view
    region.close()


def test_only_the_mapped_prefix_is_accessible():
    """The kernel maps [0, mapped) read-write and the rest of the reservation no-access; the API hands out no view
    beyond the mapped prefix."""
    region = ElasticRegion(16 * MiB)
    region.resize(5 * MiB)
    base = region.tensor(PAGE).data_ptr()
    assert protections(base, base + region.max_bytes) == [(0, 5 * MiB, "rw-p"), (5 * MiB, 16 * MiB, "---p")]
    with pytest.raises(A.ElasticLimitError, match="beyond the mapped prefix"):
        region.tensor(5 * MiB + 1)
    view = region.tensor()
    with pytest.raises(IndexError):
        view[5 * MiB]
    assert view[4 * MiB:].numel() == MiB  # slicing clamps to the view
    del view
    region.resize(2 * MiB)
    assert protections(base, base + region.max_bytes) == [(0, 2 * MiB, "rw-p"), (2 * MiB, 16 * MiB, "---p")]
    region.close()


def test_shrinking_below_a_live_view_is_refused_until_every_derived_view_is_gone():
    region = ElasticRegion(8 * MiB)
    region.resize(8 * MiB)
    view = region.tensor(6 * MiB)
    view.copy_(random_bytes(6 * MiB, seed=1))
    expected = view.clone()
    derived = view[MiB:2 * MiB].view(torch.int32)  # a view of a view keeps the storage (and the lease) alive
    del view
    small = region.tensor(PAGE)
    assert region.num_views == 2 and region.view_extent == 6 * MiB
    with pytest.raises(A.ElasticLeaseError, match=r"1 live tensor view\(s\) reach up to byte 6291456"):
        region.resize(4 * MiB)
    assert region.mapped_bytes == 8 * MiB
    assert torch.equal(region.tensor(6 * MiB), expected)
    region.resize(6 * MiB)  # down to the farthest view is allowed
    del derived
    gc.collect()
    assert region.num_views == 1 and region.view_extent == PAGE
    with pytest.raises(A.ElasticLeaseError):
        region.resize(0)
    assert region.resize(PAGE) == PAGE
    assert torch.equal(small, expected[:PAGE])
    del small
    assert region.resize(0) == 0
    region.close()


def test_a_view_freed_on_another_thread_drops_its_lease():
    region = ElasticRegion(MiB)
    region.resize(MiB)
    holder = [region.tensor()]
    worker = threading.Thread(target=holder.clear)
    worker.start()
    worker.join()
    assert region.num_views == 0
    assert region.resize(0) == 0
    region.close()


def test_resize_above_the_maximum_is_refused_and_changes_nothing():
    region = ElasticRegion(3 * MiB + 1)  # rounded up to whole pages
    assert region.max_bytes == 3 * MiB + PAGE and region.granularity == PAGE
    region.resize(2 * MiB)
    region.tensor().fill_(7)
    with pytest.raises(A.ElasticLimitError, match="above the reserved maximum"):
        region.resize(region.max_bytes + 1)
    assert region.mapped_bytes == 2 * MiB and bool((region.tensor() == 7).all())
    assert region.resize(region.max_bytes) == region.max_bytes
    with pytest.raises(A.ElasticLimitError):
        region.resize(-1)
    region.close()


def test_a_failed_map_leaves_the_region_as_it_was():
    region = ElasticRegion(32 * MiB)
    region.resize(4 * MiB)
    region.tensor().copy_(random_bytes(4 * MiB, seed=3))
    expected = region.tensor().clone()
    gc.collect()
    rss, mapped = rss_bytes(), elastic_memory_stats()["mapped_bytes"]
    _C._elastic_inject_map_failure(0)  # the next commit maps its 28 MiB, then fails as out of memory
    with pytest.raises(A.ElasticMapError, match="injected out-of-memory"):
        region.resize(32 * MiB)
    assert region.mapped_bytes == 4 * MiB
    assert elastic_memory_stats()["mapped_bytes"] == mapped
    assert abs(rss_bytes() - rss) <= RSS_TOLERANCE
    base = region.tensor(PAGE).data_ptr()
    assert protections(base, base + region.max_bytes) == [(0, 4 * MiB, "rw-p"), (4 * MiB, 32 * MiB, "---p")]
    assert torch.equal(region.tensor(), expected)
    assert region.resize(32 * MiB) == 32 * MiB  # the hook fires once
    region.close()


def test_granularity_is_configurable_in_page_multiples():
    region = ElasticRegion(MiB, granularity=64 * 1024)
    assert region.resize(1) == 64 * 1024
    assert region.resize(64 * 1024 + 1) == 128 * 1024
    region.close()
    with pytest.raises(A.ElasticLimitError, match="not a multiple of the page size"):
        ElasticRegion(MiB, granularity=PAGE + 1)
    with pytest.raises(A.ElasticLimitError):
        ElasticRegion(0)


def test_close_is_refused_under_a_view_and_a_dropped_region_lives_until_its_last_view():
    gc.collect()  # regions of earlier tests are freed before the counters are read
    mapped = elastic_memory_stats()["mapped_bytes"]
    region = ElasticRegion(4 * MiB)
    region.resize(4 * MiB)
    view = region.tensor()
    with pytest.raises(A.ElasticLeaseError, match="cannot close"):
        region.close()
    assert not region.closed and region.mapped_bytes == 4 * MiB
    del region  # deferred: the view keeps the reservation and its memory
    gc.collect()
    view.fill_(9)
    assert bool((view == 9).all())
    assert elastic_memory_stats()["mapped_bytes"] == mapped + 4 * MiB
    del view  # the last lease frees the region
    assert elastic_memory_stats()["mapped_bytes"] == mapped

    region = ElasticRegion(MiB)
    region.resize(MiB)
    region.close()
    region.close()  # idempotent
    assert region.closed and region.mapped_bytes == 0 and elastic_memory_stats()["mapped_bytes"] == mapped
    with pytest.raises(A.ElasticLimitError, match="closed"):
        region.resize(PAGE)
    with pytest.raises(A.ElasticLimitError, match="closed"):
        region.tensor(0)


def test_leaving_a_with_block_on_an_error_keeps_that_error():
    with pytest.raises(KeyError):
        with ElasticRegion(MiB) as region:
            region.resize(MiB)
            view = region.tensor()
            raise KeyError("the caller's error")
    del view


def test_peak_counts_the_high_water_mark_of_mapped_bytes():
    region = ElasticRegion(16 * MiB)
    gc.collect()
    start = elastic_memory_stats()["mapped_bytes"]
    reset_elastic_peak()
    region.resize(12 * MiB)
    region.resize(2 * MiB)
    stats = elastic_memory_stats()
    assert stats == {"mapped_bytes": start + 2 * MiB, "peak_mapped_bytes": start + 12 * MiB}
    region.close()


def test_the_memfd_maps_the_same_bytes():
    region = ElasticRegion(8 * MiB, shareable=True)
    assert region.fd is not None and os.fstat(region.fd).st_size == 8 * MiB
    region.resize(6 * MiB)
    region.tensor().copy_(random_bytes(6 * MiB, seed=5))
    with mmap.mmap(region.fd, 6 * MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as other:
        assert other[:] == region.tensor().numpy().tobytes()
        other[:4] = b"\x01\x02\x03\x04"  # writes through the fd land in the region
        assert region.tensor(4).tolist() == [1, 2, 3, 4]
    region.resize(2 * MiB)  # the released range is punched out of the file: it reads zeros, the size stays
    assert os.fstat(region.fd).st_size == 8 * MiB
    assert os.pread(region.fd, 4 * MiB, 2 * MiB) == bytes(4 * MiB)
    assert ElasticRegion(MiB).fd is None
    region.close()
    assert region.fd is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a usable GPU")
def test_a_cuda_region_without_a_gpu_raises_a_typed_error():
    with pytest.raises(A.ElasticMapError, match="cuda"):
        ElasticRegion(MiB, device="cuda")


# ---------------------------------------------------------------------------------------------------------------
# KV pool

def layout_for(engine, order, dtype="float16", layers=3, heads=4, head_dim=8, block_size=4):
    return KVLayout(engine, order, layers, heads, head_dim, block_size, dtype)


def physical_axes(engine, order):
    """Logical axis of each physical axis, from the layouts' documented memory order (independent of KVLayout)."""
    if engine == "sglang":
        return (0, 1, 2)  # (tokens, H, d)
    if order == "NHD":
        return (0, 1, 2, 3, 4)
    return (0, 1, 3, 2, 4)  # heads before tokens inside a block


@pytest.mark.parametrize("engine, order", LAYOUTS)
def test_every_layout_views_the_regions_and_writes_land_in_them(engine, order):
    layout = layout_for(engine, order)
    degree = 2
    heads, bs, d, itemsize = 2, 4, 8, 2  # 4 KV heads at TP2
    region_bytes = bs * heads * d * itemsize
    per_buffer_block = region_bytes * (2 if engine != "sglang" else 1)
    with ElasticKVPool(layout, 64 * 1024) as pool:
        assert pool.bytes_for_blocks(11, degree) == PAGE  # 11 blocks of 256 bytes fit one page
        pool.resize(pool.bytes_for_blocks(20, degree))
        num_blocks = pool.capacity_blocks(degree)
        assert pool.mapped_buffer_bytes == -(-20 * per_buffer_block // PAGE) * PAGE
        assert num_blocks == pool.mapped_buffer_bytes // per_buffer_block
        layers = pool.layers(num_blocks, degree)
        assert len(layers) == layout.num_layers
        for i, layer in enumerate(layers):
            # What the KV executor sees of this layer is the regions themselves, from their base.
            flat = layout.buffers(layer)
            assert [f.data_ptr() for f in flat] == [r.tensor(PAGE).data_ptr() for r in pool.regions[i]]
            del flat
            tensors = layer if engine == "sglang" else (layer,)
            for j, t in enumerate(tensors):
                assert tuple(t.shape) == layout.logical_shape(num_blocks, degree) and t.dtype == torch.float16
                values = torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + 1000 * (2 * i + j)
                t.copy_(values.to(torch.float16))
                raw = pool.regions[i][j].tensor(t.numel() * itemsize).view(torch.float16)
                expected = values.to(torch.float16).permute(physical_axes(engine, order)).reshape(-1)
                assert torch.equal(raw, expected), f"layer {i} buffer {j}: bytes differ"
        # The region geometry the KV planner uses: V of block b sits at region_index(1, b) * region_bytes.
        b = num_blocks - 1
        raw = pool.regions[0][1 if engine == "sglang" else 0].tensor()
        start = int(layout.region_index(1, b, num_blocks)) * region_bytes
        v_block = layers[0][1][b * bs:(b + 1) * bs] if engine == "sglang" else (
            layers[0][1, b] if engine == "vllm_flash_attn" else layers[0][b, 1])
        physical = v_block.transpose(0, 1) if order == "HND" else v_block
        assert torch.equal(raw[start:start + region_bytes].view(torch.float16), physical.reshape(-1))
        with pytest.raises(A.CapacityError, match=f"{num_blocks + 1} blocks at TP degree 2"):
            pool.layers(num_blocks + 1, degree)
        del layers, layer, tensors, t, raw, v_block, physical


def test_the_pool_holds_the_same_blocks_again_after_a_round_trip_of_degrees():
    """Bytes are kept across degrees: 7 blocks at TP2 are 3 at TP1 and 7 again at TP2 (issue 10, item 5)."""
    layout = layout_for("vllm_flash_attn", "NHD", dtype="float32", layers=1)
    with ElasticKVPool(layout, MiB) as pool:
        pool.resize(7 * layout.block_bytes(2))
        mapped = pool.mapped_buffer_bytes
        assert mapped % pool.granularity == 0
        per2, per1 = layout.block_bytes(2), layout.block_bytes(1)
        assert [pool.capacity_blocks(2), pool.capacity_blocks(1), pool.capacity_blocks(2)] == \
            [mapped // per2, mapped // per1, mapped // per2]
        assert pool.max_capacity_blocks(1) == MiB // per1


def test_pool_resize_is_all_or_nothing_when_a_map_fails():
    layout = layout_for("sglang", "NHD", layers=3)  # 6 regions
    pool = ElasticKVPool(layout, 8 * MiB)
    pool.resize(MiB)
    for layer_bufs in pool.buffers():
        for j, buf in enumerate(layer_bufs):
            buf.copy_(random_bytes(MiB, seed=j))
    del layer_bufs, buf  # views lease the regions until they are gone
    before = [[b.clone() for b in layer] for layer in pool.buffers()]
    gc.collect()
    rss, mapped = rss_bytes(), elastic_memory_stats()["mapped_bytes"]
    _C._elastic_inject_map_failure(3)  # regions 0-2 grow, region 3 fails after mapping: all go back
    with pytest.raises(A.ElasticMapError, match="injected"):
        pool.resize(8 * MiB)
    assert [r.mapped_bytes for layer in pool.regions for r in layer] == [MiB] * 6
    assert elastic_memory_stats()["mapped_bytes"] == mapped
    assert abs(rss_bytes() - rss) <= RSS_TOLERANCE
    assert all(torch.equal(g, w) for got, want in zip(pool.buffers(), before) for g, w in zip(got, want))
    with pytest.raises(A.ElasticLimitError, match="above the reserved maximum"):
        pool.resize(8 * MiB + 1)
    assert pool.mapped_buffer_bytes == MiB
    assert pool.resize(8 * MiB) == 8 * MiB and pool.mapped_bytes == 6 * 8 * MiB
    pool.close()


def test_pool_shrink_under_a_view_is_refused_before_any_region_changes():
    layout = layout_for("vllm_flashinfer", "HND", layers=4)
    pool = ElasticKVPool(layout, 2 * MiB)
    pool.resize(2 * MiB)
    degree = 1
    small = pool.layers(10, degree)  # leases exactly the bytes of 10 blocks
    last_layer_view = pool.regions[3][0].tensor()  # one full-size view, in the last region only
    with pytest.raises(A.ElasticLeaseError, match=r"1 live view\(s\) in 1 buffer\(s\).*layer 3 buffer 0"):
        pool.resize(pool.bytes_for_blocks(10, degree))
    assert [r.mapped_bytes for layer in pool.regions for r in layer] == [2 * MiB] * 4
    del last_layer_view
    assert pool.resize(pool.bytes_for_blocks(10, degree)) == pool.bytes_for_blocks(10, degree)
    assert small[0].shape[0] == 10
    with pytest.raises(A.ElasticLeaseError):
        pool.resize(0)
    with pytest.raises(A.ElasticLeaseError, match="cannot close"):
        pool.close()
    del small
    pool.resize(0)
    pool.close()


# ---------------------------------------------------------------------------------------------------------------
# CUDA (virtual memory management driver API)

cuda_ready = bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not cuda_ready, reason="needs a CUDA device and the CUDA engine (_C.cuda_compiled)")
GPU_TOLERANCE = 8 * MiB  # driver bookkeeping between two mem_get_info readings


def device_used() -> int:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shareable", [False, True], ids=["plain", "posix-fd"])
def test_cuda_region_grow_shrink_grow_follows_driver_memory(shareable):
    try:
        region = ElasticRegion(1024 * MiB, device="cuda", shareable=shareable)
    except A.ElasticMapError as e:
        if shareable:
            pytest.skip(f"POSIX fd handles unsupported here: {e}")
        raise
    g = region.granularity
    pattern = torch.randint(0, 256, (1024 * MiB,), dtype=torch.uint8, device="cuda")
    base_used = device_used()
    expected = None
    address = None
    for size in [512 * MiB, 128 * MiB + 1, 1024 * MiB, 0, 300 * MiB]:
        mapped = region.resize(size)
        assert mapped == -(-size // g) * g
        assert abs(device_used() - base_used - mapped) <= GPU_TOLERANCE, f"after resize({size})"
        view = region.tensor()
        assert view.device.type == "cuda" and view.numel() == mapped
        if mapped:  # torch reports data_ptr 0 for an empty tensor
            address = address or view.data_ptr()
            assert view.data_ptr() == address
        if expected is not None:
            kept = min(mapped, expected.numel())
            assert torch.equal(view[:kept], expected[:kept])
        view.copy_(pattern[:mapped])
        expected = view.clone()
        del view
        torch.cuda.synchronize()
    region.resize(0)
    region.close()
    del pattern, expected


@pytest.mark.gpu
@needs_cuda
def test_cuda_region_refuses_to_shrink_under_a_view_and_rolls_back_a_failed_map():
    region = ElasticRegion(256 * MiB, device="cuda")
    g = region.granularity
    region.resize(64 * MiB)
    view = region.tensor(40 * MiB)
    view.fill_(5)
    derived = view[MiB:].view(torch.int32)
    del view
    with pytest.raises(A.ElasticLeaseError, match="reach up to byte 41943040"):
        region.resize(32 * MiB)
    assert region.mapped_bytes == 64 * MiB
    del derived
    torch.cuda.synchronize()
    assert region.resize(32 * MiB) == 32 * MiB
    assert bool((region.tensor() == 5).all())

    used, mapped = device_used(), elastic_memory_stats("cuda")["mapped_bytes"]
    _C._elastic_inject_map_failure(0)
    with pytest.raises(A.ElasticMapError, match="injected"):
        region.resize(256 * MiB)
    assert region.mapped_bytes == 32 * MiB
    assert elastic_memory_stats("cuda")["mapped_bytes"] == mapped
    assert abs(device_used() - used) <= GPU_TOLERANCE
    assert bool((region.tensor() == 5).all())
    with pytest.raises(A.ElasticLimitError, match="above the reserved maximum"):
        region.resize(256 * MiB + g)
    # A real out-of-memory: ask for more than the GPU has; nothing may stay mapped.
    free, total = torch.cuda.mem_get_info()
    huge = ElasticRegion(total + 4 * g, device="cuda")
    with pytest.raises(A.ElasticMapError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        huge.resize(huge.max_bytes)
    assert huge.mapped_bytes == 0 and abs(device_used() - used) <= GPU_TOLERANCE
    huge.close()
    region.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("engine, order", LAYOUTS)
def test_cuda_pool_views_every_layout(engine, order):
    layout = layout_for(engine, order, layers=2, heads=8, head_dim=128, block_size=16)
    with ElasticKVPool(layout, 64 * MiB, device="cuda") as pool:
        pool.resize(pool.bytes_for_blocks(100, 2))
        n = pool.capacity_blocks(2)
        layers = pool.layers(n, 2)
        first = layers[0][0] if engine == "sglang" else layers[0]
        assert first.device.type == "cuda" and tuple(first.shape) == layout.logical_shape(n, 2)
        first.fill_(1.5)
        raw = pool.regions[0][0].tensor(first.numel() * 2).view(torch.float16)
        assert bool((raw == 1.5).all())
        del layers, first, raw
