"""How many KV tokens an instance holds at each TP degree, with and without the memory handoff.

Everything here is arithmetic on specs and a KV layout: no tensors, no process group, no GPU.

Per GPU, an engine gives `utilisation * memory_bytes - reserved_bytes` ("usable" bytes) to weights and the KV pool
(vLLM's gpu_memory_utilization; reserved_bytes stands for activations, CUDA graphs and other non-pool memory the
caller wants set aside). At TP degree d:

  weights     W(d) = the largest rank's sum over parameters of its shard's bytes at d (ParamSpec.shard_shape: vocab
              padding and replicated KV heads included, replicated tensors counted whole on every rank)
  KV / token  K(d) = num_layers * 2 * local_kv_heads(d) * head_dim * itemsize on each rank; local_kv_heads(d) is
              num_kv_heads / d, or 1 once d > num_kv_heads (each KV head is replicated on d / num_kv_heads ranks)
  tokens      an instance's capacity is its per-rank block count times block_size (every rank of an instance
              holds the same block ids, each for its own heads), less the layout's reserved blocks

  with the handoff     the pool takes everything the weights leave: P(d) = usable - W(d), so a merge turns the
                       W(base) - W(d) bytes it frees into KV and a split takes them back;
  without the handoff  the pool keeps the byte size it was given at the base degree, P(base) = usable - W(base),
                       and is re-cut into blocks at d (what retp does today). Below the base degree the weights
                       grow while the pool does not shrink, so those degrees do not fit.

The base degree defaults to the smallest listed degree at which the weights fit with room for one block.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import CapacityError, ConfigError, InvalidDegreeError
from .layout.kv import KVLayout

# An "80 GB" H100 SXM (HBM3): nvidia-smi reports 81,559 MiB of device memory.
H100_80GB_MEMORY_BYTES = 81559 << 20


class WeightsDoNotFitError(CapacityError):
    """The weight shards of one GPU at a degree need more than the usable memory (or leave no room for a KV block)."""


# ---- per-GPU sizes -----------------------------------------------------------------------------------------------
def weight_bytes_per_gpu(specs: Sequence, degree: int) -> int:
    """Bytes of weights on the largest rank of a TP-`degree` instance (shards padded as they are stored)."""
    for s in specs:
        s.check_degree(degree)
    per_rank = []
    for tp_rank in range(degree):
        total = 0
        for s in specs:
            n = 1
            for dim in s.shard_shape(tp_rank, degree):
                n *= dim
            total += n * s.itemsize
        per_rank.append(total)
    return max(per_rank)


def kv_bytes_per_token_per_gpu(layout: KVLayout, degree: int) -> int:
    """K and V bytes of one token over all layers on one rank of a TP-`degree` instance."""
    layout.check_degree(degree)
    return layout.num_layers * layout.block_bytes(degree) // layout.block_size


def usable_bytes_per_gpu(memory_bytes: int, utilisation: float, reserved_bytes: int = 0) -> int:
    """floor(utilisation * memory_bytes) - reserved_bytes: what weights and the KV pool may use on one GPU."""
    if memory_bytes <= 0 or not 0.0 < utilisation <= 1.0 or reserved_bytes < 0:
        raise ConfigError(f"need memory_bytes > 0, 0 < utilisation <= 1 and reserved_bytes >= 0; got memory_bytes="
                          f"{memory_bytes}, utilisation={utilisation}, reserved_bytes={reserved_bytes}")
    return int(memory_bytes * utilisation) - reserved_bytes


def kv_blocks_for_pool(layout: KVLayout, pool_bytes_per_gpu: int, degree: int) -> int:
    """Blocks per rank a pool of pool_bytes_per_gpu (all layers together) holds at `degree`, reserved blocks
    included: the pool is split evenly into the layout's per-layer buffers, each cut into whole blocks."""
    if pool_bytes_per_gpu <= 0:
        return 0
    buffer_bytes = pool_bytes_per_gpu // (layout.num_layers * layout.num_buffers)
    return layout.num_blocks_for(buffer_bytes, degree)


def kv_tokens_for_pool(layout: KVLayout, pool_bytes_per_gpu: int, degree: int) -> int:
    """Tokens an instance of `degree` holds when each of its ranks has a pool of pool_bytes_per_gpu."""
    blocks = kv_blocks_for_pool(layout, pool_bytes_per_gpu, degree) - layout.reserved_blocks
    return max(blocks, 0) * layout.block_size


# ---- one degree ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DegreeCapacity:
    """KV capacity of one TP-`degree` instance. Sizes per GPU unless the name says instance.

    status: "ok", "weights_do_not_fit" (W(d) leaves no room for one block) or "invalid_degree" (d does not divide
    the heads / units of the model); sizes are 0 or None when the status is not "ok".
    kv_*_no_handoff are None where the degree does not fit without the handoff (no base, or d below the base).
    """

    degree: int
    status: str
    usable_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_pool_bytes: int
    kv_blocks: int
    kv_tokens_per_instance: int
    base_degree: Optional[int]
    freed_weight_bytes: Optional[int]        # W(base) - W(d): what a merge from the base hands to the pool
    kv_pool_bytes_no_handoff: Optional[int]
    kv_blocks_no_handoff: Optional[int]
    kv_tokens_per_instance_no_handoff: Optional[int]

    @property
    def fits(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def degree_capacity(specs: Sequence, layout: KVLayout, degree: int, memory_bytes: int, utilisation: float, *,
                    base_degree: Optional[int] = None, reserved_bytes: int = 0) -> DegreeCapacity:
    """The KV capacity of one instance at `degree`, with the handoff and (given a base degree) without it.

    Raises InvalidDegreeError when the model cannot be split over `degree` ranks and WeightsDoNotFitError when the
    weights of one GPU leave no room for a KV block (or, with a base degree, when they do at the base).
    """
    usable = usable_bytes_per_gpu(memory_bytes, utilisation, reserved_bytes)
    weights = weight_bytes_per_gpu(specs, degree)
    per_token = kv_bytes_per_token_per_gpu(layout, degree)
    pool = usable - weights
    blocks = kv_blocks_for_pool(layout, pool, degree)
    if blocks <= layout.reserved_blocks:
        raise WeightsDoNotFitError(
            f"TP{degree}: {weights} bytes of weights per GPU leave {pool} of {usable} usable bytes "
            f"({utilisation} x {memory_bytes} - {reserved_bytes} reserved), less than one KV block of "
            f"{layout.num_layers * layout.block_bytes(degree)} bytes beside {layout.reserved_blocks} reserved")
    freed = pool_nh = blocks_nh = tokens_nh = None
    if base_degree is not None:
        base_weights = weight_bytes_per_gpu(specs, base_degree)
        base_pool = usable - base_weights
        if kv_blocks_for_pool(layout, base_pool, base_degree) <= layout.reserved_blocks:
            raise WeightsDoNotFitError(f"base degree TP{base_degree}: {base_weights} bytes of weights per GPU "
                                       f"leave {base_pool} of {usable} usable bytes, less than one KV block")
        freed = base_weights - weights
        if weights <= base_weights:       # the pool keeps its bytes; below the base the weights would not fit
            pool_nh = base_pool
            blocks_nh = kv_blocks_for_pool(layout, base_pool, degree)
            tokens_nh = kv_tokens_for_pool(layout, base_pool, degree)
    return DegreeCapacity(
        degree=degree, status="ok", usable_bytes=usable, weight_bytes=weights, kv_bytes_per_token=per_token,
        kv_pool_bytes=pool, kv_blocks=blocks, kv_tokens_per_instance=kv_tokens_for_pool(layout, pool, degree),
        base_degree=base_degree, freed_weight_bytes=freed, kv_pool_bytes_no_handoff=pool_nh,
        kv_blocks_no_handoff=blocks_nh, kv_tokens_per_instance_no_handoff=tokens_nh)


# ---- a table over degrees ----------------------------------------------------------------------------------------
def _not_fitting(degree: int, status: str, usable: int, weights: int, per_token: int) -> DegreeCapacity:
    return DegreeCapacity(degree, status, usable, weights, per_token, 0, 0, 0, None, None, None, None, None)


def capacity_report(specs: Sequence, layout: KVLayout, memory_bytes: int, utilisation: float,
                    degrees: Iterable[int] = (1, 2, 4, 8), *, base_degree: Optional[int] = None,
                    reserved_bytes: int = 0) -> List[DegreeCapacity]:
    """One DegreeCapacity per degree (in the order given). Degrees that are invalid for the model or where the
    weights do not fit are reported with that status instead of raising. base_degree defaults to the smallest
    listed degree that fits; when none fits every row says so and no no-handoff figures are given."""
    degrees = list(degrees)
    usable = usable_bytes_per_gpu(memory_bytes, utilisation, reserved_bytes)
    rows = {}
    for d in degrees:
        try:
            rows[d] = degree_capacity(specs, layout, d, memory_bytes, utilisation, reserved_bytes=reserved_bytes)
        except InvalidDegreeError:
            rows[d] = _not_fitting(d, "invalid_degree", usable, 0, 0)
        except WeightsDoNotFitError:
            rows[d] = _not_fitting(d, "weights_do_not_fit", usable, weight_bytes_per_gpu(specs, d),
                                   kv_bytes_per_token_per_gpu(layout, d))
    if base_degree is None:
        base_degree = min((d for d in degrees if rows[d].fits), default=None)
    if base_degree is None:
        return [rows[d] for d in degrees]
    return [degree_capacity(specs, layout, d, memory_bytes, utilisation, base_degree=base_degree,
                            reserved_bytes=reserved_bytes) if rows[d].fits else rows[d] for d in degrees]


def smallest_fitting_degree(specs: Sequence, layout: KVLayout, memory_bytes: int, utilisation: float,
                            degrees: Iterable[int] = (1, 2, 4, 8), reserved_bytes: int = 0) -> int:
    """The smallest of `degrees` at which the weights fit beside at least one KV block; WeightsDoNotFitError if
    none does."""
    rows = capacity_report(specs, layout, memory_bytes, utilisation, degrees, reserved_bytes=reserved_bytes)
    fitting = [r.degree for r in rows if r.fits]
    if not fitting:
        raise WeightsDoNotFitError(f"the weights fit at none of the degrees {[r.degree for r in rows]}: per-GPU "
                                   f"weight bytes {[r.weight_bytes for r in rows]}, usable {rows[0].usable_bytes}")
    return min(fitting)


# ---- what retp maps -----------------------------------------------------------------------------------------------
def handoff_buffer_bytes(specs: Sequence, layout: KVLayout, old_degree: int, new_degree: int,
                         mapped_buffer_bytes: int, *, granularity: int, max_buffer_bytes: int,
                         pool_bytes: Optional[int] = None, slack_bytes: int = 0) -> Tuple[int, int]:
    """(bytes each physical buffer of a rank's elastic KV pool maps after a change from old_degree to new_degree,
    the budget bytes left unmapped).

    Default (the handoff): the rank keeps its memory budget, weights W(old) + the pool's mapped bytes + slack_bytes
    (what earlier rounding left unmapped); the pool gets what the weights at new_degree leave of it, spread evenly
    over the rank's num_layers * num_buffers buffers. A merge thus maps the weight bytes it frees, a split unmaps
    what its weights need. With pool_bytes: the caller's target for the whole pool of one rank instead (no slack
    carried). Rounded down to the granularity and within [0, max_buffer_bytes]; the bytes that rounding or the
    maximum leave unmapped are returned as the new slack, so that repeated merges and splits lose nothing."""
    buffers = layout.num_layers * layout.num_buffers
    if pool_bytes is not None:
        budget = int(pool_bytes)
    else:
        budget = (weight_bytes_per_gpu(specs, old_degree) + mapped_buffer_bytes * buffers + slack_bytes
                  - weight_bytes_per_gpu(specs, new_degree))
    target = max(0, budget) // buffers // granularity * granularity
    target = min(target, max_buffer_bytes // granularity * granularity)
    return target, (max(0, budget - target * buffers) if pool_bytes is None else 0)
