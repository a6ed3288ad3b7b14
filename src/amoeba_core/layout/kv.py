"""Paged KV cache layouts of common engines, and the byte geometry of a rank's pool.

Per layer and rank, a pool holds num_blocks blocks of block_size tokens for this rank's KV heads (split like the QKV
weight, KV heads replicated when degree > num_kv_heads). Supported layouts (logical tensor shapes):

  vllm_flash_attn  (2, num_blocks, block_size, H_local, head_dim)   one tensor per layer; K = [0], V = [1]
  vllm_flashinfer  (num_blocks, 2, block_size, H_local, head_dim)   one tensor per layer
  sglang           k, v: (num_blocks * block_size, H_local, head_dim) two tensors per layer (token-slot pools,
                   page = block of block_size slots; the page size is block_size)
  vllm_mla         (num_blocks, block_size, kv_lora_rank + rope_dim)   one tensor per layer, one component (the
                   latent [kv_c_normed; k_pe]); num_kv_heads is 1 and head_dim the latent width: the one latent
                   "head" is replicated on every TP rank of an instance (vLLM's MLA cache, identical on all ranks),
                   so a merge brings every rank the other instances' blocks and a split leaves each new instance's
                   ranks a copy of their sequences' blocks. NHD only (there is no head dim).

order "NHD" stores the tensors as shown; "HND" stores heads before tokens inside a block: the physical tensor is
(2, N, H, B, d) resp. (N, 2, H, B, d), and the logical tensor an engine sees is its transpose(-3, -2) view. SGLang
pools are NHD only.

Geometry: a *buffer* is one contiguous physical tensor (1 per layer, 2 for sglang). Inside a buffer the pool is a
sequence of *regions*, one per (component, block), each block_size * H_local * head_dim * itemsize bytes. The
components are K and V (num_components 2), or the latent alone for MLA (1):
  vllm_flash_attn: region index c * N + b        vllm_flashinfer: region index 2 * b + c
  sglang:          buffer c, region index b      vllm_mla:        region index b
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from ..errors import ConfigError, InvalidDegreeError, SpecMismatchError
from .specs import Section, section_ranges

ENGINES = ("vllm_flash_attn", "vllm_flashinfer", "sglang", "vllm_mla")
ORDERS = ("NHD", "HND")


@dataclass(frozen=True)
class KVLayout:
    """Description of one model's paged KV cache on every rank (same on all ranks).

    num_layers, num_kv_heads (total, before TP), head_dim, block_size (tokens per block / page), dtype (torch
    dtype name). reserved_blocks: block ids [0, reserved_blocks) are never used for sequences nor assigned (e.g. 1
    for vLLM's null block or SGLang's padding page).
    """

    engine: str
    order: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    reserved_blocks: int = 0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"KV engine layout {self.engine!r} is not one of {ENGINES}")
        if self.order not in ORDERS or (self.engine in ("sglang", "vllm_mla") and self.order != "NHD"):
            raise ConfigError(f"KV order {self.order!r} is not supported for {self.engine} (NHD, or HND for vLLM "
                              f"K/V layouts)")
        if self.engine == "vllm_mla" and self.num_kv_heads != 1:
            raise ConfigError(f"an MLA cache has one latent head, got num_kv_heads {self.num_kv_heads}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"KV layout {name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ConfigError(f"KV dtype {self.dtype!r} is not a torch dtype")

    @classmethod
    def mla(cls, num_layers: int, kv_lora_rank: int, rope_dim: int, block_size: int, dtype: str,
            reserved_blocks: int = 0) -> "KVLayout":
        """vLLM's MLA cache: (num_blocks, block_size, kv_lora_rank + rope_dim) per layer, the same on every rank."""
        return cls("vllm_mla", "NHD", num_layers, 1, kv_lora_rank + rope_dim, block_size, dtype, reserved_blocks)

    # ---- heads ---------------------------------------------------------------------------------------------
    @property
    def section(self) -> Section:
        return Section("kv_heads", self.num_kv_heads, 1, "kv_heads")

    def check_degree(self, degree: int) -> None:
        n = self.num_kv_heads
        if degree > n and degree % n:
            raise InvalidDegreeError(f"KV cache: TP degree {degree} exceeds the {n} KV heads but is not a "
                                     f"multiple of it")
        if degree <= n and n % degree:
            raise InvalidDegreeError(f"KV cache: TP degree {degree} does not divide the {n} KV heads")

    def head_range(self, tp_rank: int, degree: int) -> Tuple[int, int]:
        """[first, last) global KV heads that TP rank tp_rank of degree holds."""
        return tuple(section_ranges((self.section,), tp_rank, degree)[0])

    def local_heads(self, degree: int) -> int:
        a, b = self.head_range(0, degree)
        return b - a

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def num_buffers(self) -> int:
        return 2 if self.engine == "sglang" else 1

    @property
    def num_components(self) -> int:
        """Tensors per block: K and V (2), or MLA's latent (1)."""
        return 1 if self.engine == "vllm_mla" else 2

    @property
    def regions_per_buffer(self) -> int:
        """(component, block) regions of one block inside one buffer."""
        return self.num_components // self.num_buffers

    def region_bytes(self, degree: int) -> int:
        """Bytes of one (component, block) region at this degree."""
        return self.block_size * self.local_heads(degree) * self.head_dim * self.itemsize

    def block_bytes(self, degree: int) -> int:
        """Bytes of one block (every component) of one layer on one rank."""
        return self.num_components * self.region_bytes(degree)

    def num_blocks_for(self, buffer_bytes: int, degree: int) -> int:
        """Blocks a buffer of buffer_bytes holds at this degree (its bytes are kept across degrees)."""
        return buffer_bytes // (self.region_bytes(degree) * self.regions_per_buffer)

    def region_index(self, component, block, num_blocks: int):
        """Index of the (component, block) region inside its buffer (works on numpy arrays)."""
        if self.engine == "vllm_flash_attn":
            return component * num_blocks + block
        if self.engine == "vllm_flashinfer":
            return 2 * block + component
        return block  # sglang (the buffer is the component) and vllm_mla (one component)

    def region_owner(self, index, num_blocks: int):
        """Inverse of region_index for one buffer: (component, block) arrays; component is -1 for sglang (the
        buffer is the component)."""
        if self.engine == "vllm_flash_attn":
            return np.divmod(index, num_blocks)
        if self.engine == "vllm_flashinfer":
            block, component = np.divmod(index, 2)
            return component, block
        if self.engine == "vllm_mla":
            return index * 0, index
        return index * 0 - 1, index

    # ---- tensors -------------------------------------------------------------------------------------------
    def logical_shape(self, num_blocks: int, degree: int) -> Tuple[int, ...]:
        h, b, d = self.local_heads(degree), self.block_size, self.head_dim
        if self.engine == "vllm_flash_attn":
            return (2, num_blocks, b, h, d)
        if self.engine == "vllm_flashinfer":
            return (num_blocks, 2, b, h, d)
        if self.engine == "vllm_mla":
            return (num_blocks, b, d)
        return (num_blocks * b, h, d)

    def physical_shape(self, num_blocks: int, degree: int) -> Tuple[int, ...]:
        shape = list(self.logical_shape(num_blocks, degree))
        if self.order == "HND":
            shape[-3], shape[-2] = shape[-2], shape[-3]
        return tuple(shape)

    def buffers(self, layer) -> List[torch.Tensor]:
        """The physical buffers of one layer's tensor(s), as flat uint8 tensors (checked contiguous)."""
        tensors = list(layer) if self.engine == "sglang" else [layer]
        if len(tensors) != self.num_buffers:
            raise SpecMismatchError(f"{self.engine} layers hold {self.num_buffers} tensor(s), got {len(tensors)}")
        out = []
        for t in tensors:
            phys = t.transpose(-3, -2) if self.order == "HND" else t
            if not phys.is_contiguous():
                raise SpecMismatchError(f"KV tensor of shape {tuple(t.shape)} and strides {t.stride()} is not a "
                                        f"contiguous {self.order} {self.engine} pool")
            out.append(phys.reshape(-1).view(torch.uint8))
        return out

    def views(self, buffers: List[torch.Tensor], num_blocks: int, degree: int):
        """One layer's logical tensor(s) at `degree` over the given flat uint8 buffers (a prefix of each)."""
        dt = getattr(torch, self.dtype)
        phys_shape = self.physical_shape(num_blocks, degree)
        n = 1
        for s in phys_shape:
            n *= s
        out = []
        for buf in buffers:
            phys = buf[:n * self.itemsize].view(dt).view(phys_shape)
            out.append(phys.transpose(-3, -2) if self.order == "HND" else phys)
        return tuple(out) if self.engine == "sglang" else out[0]

    def allocate(self, num_blocks: int, degree: int, device="cpu"):
        """A zeroed pool of num_layers layers in this layout (for tests, demos and benchmarks)."""
        dt = getattr(torch, self.dtype)
        layers = []
        for _ in range(self.num_layers):
            bufs = [torch.zeros(self.physical_shape(num_blocks, degree), dtype=dt, device=device)
                    for _ in range(self.num_buffers)]
            flat = [b.view(-1).view(torch.uint8) for b in bufs]
            layers.append(self.views(flat, num_blocks, degree))
        return layers

    def signature(self) -> str:
        return (f"{self.engine}/{self.order}/L{self.num_layers}/H{self.num_kv_heads}/d{self.head_dim}/"
                f"B{self.block_size}/{self.dtype}/r{self.reserved_blocks}")
