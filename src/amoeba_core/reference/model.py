"""A tensor-parallel Llama / Mistral / Qwen2 decoder over a paged KV cache, in plain torch (see the package doc).

Shapes: T = tokens of one step (all sequences, flattened), h = hidden size, d = head_dim, Hq / Hkv = query / KV
heads of this rank (its TP shard), V = vocab_size, Vp = V padded to a multiple of 64. Activations are float32
whatever the weight dtype (weights are upcast at use); the KV cache stores the weights' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..api import retp
from ..config import TPConfig
from ..errors import CapacityError, ConfigError, RetpAborted, TransformationFailed
from ..integration import bind_weights, instance_groups, module_weights
from ..kv import KVCache, KVLayout
from ..layout import model_dims, shard
from .blocks import BlockManager

# ---- process groups -------------------------------------------------------------------------------------------
def instance_group(config: TPConfig, rank: int):
    """The process group of `rank`'s instance in `config` (None at degree 1); integration.instance_groups has the
    members' order. Collective over the default group: every rank must call it with the same config."""
    if config.slot(rank) != config.slot(dist.get_rank()):
        raise ConfigError(f"instance_group builds the calling rank's group ({dist.get_rank()}), not rank {rank}'s")
    return instance_groups(config).group


# ---- the model as a module --------------------------------------------------------------------------------------
def build_module(weights: Mapping[str, torch.Tensor], head_dim: int, rope_theta: float,
                 requires_grad: bool = False) -> nn.Module:
    """An nn.Module tree whose parameters carry the shards' (vLLM) names: "model.layers.0.self_attn.qkv_proj.weight"
    is the parameter `weight` of submodule model.layers.0.self_attn.qkv_proj; plus the rotary frequencies as a
    non-persistent buffer model.rotary_emb.inv_freq (head_dim // 2,) float32, which no spec describes (retp leaves
    it alone). Parameters share the shards' storage."""
    root = nn.Module()

    def submodule(path: str) -> nn.Module:
        node = root
        for part in path.split(".") if path else ():
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        return node

    for name, tensor in weights.items():
        path, _, attr = name.rpartition(".")
        submodule(path).register_parameter(attr, nn.Parameter(tensor, requires_grad=requires_grad))
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    submodule("model.rotary_emb").register_buffer("inv_freq", inv_freq, persistent=False)
    return root


# ---- paged KV access (works for every amoeba_core.kv layout, NHD or HND) -----------------------------------
def kv_pools(layout: KVLayout, layer):
    """(K, V) views of one layer's cache, each (num_blocks, block_size, H_local, d) in the cache dtype; for an MLA
    cache the one latent component, (latent,) of shape (num_blocks, block_size, 1, kv_lora_rank + rope_dim).

    Views share storage with the layer, so indexing into them reads and index-assignment writes the cache.
    """
    if layout.engine == "vllm_mla":
        return (layer[:, :, None, :],)
    if layout.engine == "vllm_flash_attn":
        return layer[0], layer[1]
    if layout.engine == "vllm_flashinfer":
        return layer[:, 0], layer[:, 1]
    k, v = layer  # sglang token pools (num_blocks * block_size, H, d), NHD
    return (k.view(-1, layout.block_size, *k.shape[1:]), v.view(-1, layout.block_size, *v.shape[1:]))


def kv_write(layout: KVLayout, layer, table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store k, v (n, H_local, d) of tokens at `positions` (n,) of a sequence with block table `table` (long)."""
    K, V = kv_pools(layout, layer)
    blocks, offs = table[positions // layout.block_size], positions % layout.block_size
    K[blocks, offs] = k.to(K.dtype)
    V[blocks, offs] = v.to(V.dtype)


def kv_read(layout: KVLayout, layer, table: torch.Tensor, length: int):
    """K, V of the first `length` tokens of a sequence: each (length, H_local, d) float32."""
    K, V = kv_pools(layout, layer)
    shape = (-1,) + tuple(K.shape[2:])
    return K[table].reshape(shape)[:length].float(), V[table].reshape(shape)[:length].float()


# ---- math ----------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, h) fp32 -> x / rms(x) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float,
           inv_freq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neox-style (HF Llama) rotary embedding of x (T, H, d) fp32 at positions (T,); inv_freq (d // 2,) fp32, by
    default 1 / theta ** (2i / d)."""
    d = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]          # (T, 1, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of q (n, Hq, d) at `positions` (n,) over k, v (ctx, Hkv, d); returns (n, Hq, d) fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) * q.shape[-1] ** -0.5
    mask = torch.arange(k.shape[0])[None, :] > positions[:, None]  # (n, ctx): key after the query
    probs = scores.masked_fill(mask[None], float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, w.float(), None if b is None else b.float())


# ---- sequences and the engine --------------------------------------------------------------------------------
@dataclass
class SeqState:
    """Scheduler metadata of one sequence (plain data: shared across ranks with all_gather_object)."""

    seq_id: int
    prompt: List[int]
    max_new_tokens: int
    generated: List[int] = field(default_factory=list)
    status: str = "waiting"  # waiting -> running -> finished (running -> waiting when preempted)
    arrival: int = 0         # the engine step at which the request arrives (admitted no earlier)

    @property
    def kv_len(self) -> int:
        """Tokens whose K/V is in the cache while running: the prompt and every generated token but the last (fed
        in the next step)."""
        return len(self.prompt) + len(self.generated) - 1 if self.generated else 0


class TPEngine:
    """One rank of a TP instance: its model, paged KV cache, block manager and scheduler.

    All ranks of an instance run the same scheduler on the same metadata, so their block tables agree; only the
    instance's scheduler rank (TP rank `scheduler_tp_rank`, vLLM's driver worker) hands them to retp, as an engine
    whose scheduler lives in one process would. weights: fused name -> this rank's shard (amoeba_core.shard of the
    full tensor), kept as the parameters of an nn.Module (`model`, build_module) that retp rebinds in place;
    layers: the KV cache in `layout` (layout.allocate(num_blocks, degree), or pool.layers(...)); seqs: this
    instance's SeqStates (waiting, to be admitted). pool: the amoeba_core.elastic.ElasticKVPool the layers view, if
    any: each retp then resizes it (a merge turns the weight memory it frees into KV blocks, a split gives it back).
    prefix_caching: keep full prompt blocks in a prefix cache (blocks.BlockManager) that survives retp.
    """

    def __init__(self, rank: int, hf_config: Mapping, specs: Sequence, weights: Dict[str, torch.Tensor],
                 tp: TPConfig, layout: KVLayout, layers: List, seqs: Sequence[SeqState], record_logits: bool = False,
                 pool=None, prefix_caching: bool = False, scheduler_tp_rank: int = 0):
        if hf_config.get("rope_scaling"):
            raise ConfigError("the reference engine does not implement rope_scaling")
        self.rank, self.specs, self.layout = rank, list(specs), layout
        self.dims = model_dims(hf_config)
        self.eps = float(hf_config.get("rms_norm_eps", 1e-6))
        self.theta = float(hf_config.get("rope_theta", 10000.0))
        self.model = build_module(weights, self.dims["head_dim"], self.theta)
        self.weights = module_weights(self.model, self.specs)           # name -> the module's shard (a view)
        self.spec = {s.name: s for s in self.specs}
        self.family = _families.family_of(hf_config)                   # MoE, MLA, q/k norms, FP8 (families.py)
        self.seqs: Dict[int, SeqState] = {s.seq_id: s for s in seqs}   # every sequence this rank knows of
        self.owned = [s.seq_id for s in seqs]                          # this instance's (any status)
        self.record_logits = record_logits
        self.preemptions = 0
        self.logits: Dict[int, Dict[int, torch.Tensor]] = {}           # seq -> token index -> (V,) fp32
        self.pool = pool
        self.scheduler_tp_rank = scheduler_tp_rank
        self.strict_capacity = True  # a request no instance of this degree can ever hold is an error
        self.formed_at = -math.inf   # the step the current configuration began (for the TP policy)
        self.kv_buffers = None if pool is not None else [layout.buffers(layer) for layer in layers]
        num_blocks = KVCache(layout, layers, {}).current_blocks(tp.degree)
        self.blocks = BlockManager(num_blocks, layout.block_size, layout.reserved_blocks, prefix_caching)
        self._adopt_config(tp, layers, num_blocks)

    # ---- configuration -------------------------------------------------------------------------------------
    def _adopt_config(self, tp: TPConfig, layers: List, num_blocks: int) -> None:
        self.tp, self.slot = tp, tp.slot(self.rank)
        self.instance = instance_groups(tp)   # this rank's instance: process group, members in TP order
        self.group = self.instance.group
        self.layers = layers
        self.num_blocks = num_blocks

    @property
    def tables(self) -> Dict[int, List[int]]:
        """Running sequence -> block table (the block manager's)."""
        return self.blocks.tables

    @property
    def is_scheduler_rank(self) -> bool:
        return self.slot.tp_rank == min(self.scheduler_tp_rank, self.slot.degree - 1)

    def describe(self) -> str:
        return f"{self.tp.num_instances}x{self.tp.degree}"

    # ---- collectives within the instance -------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    # ---- layers ------------------------------------------------------------------------------------------------
    def w(self, name: str) -> Optional[torch.Tensor]:
        if self.family.fp8_block is not None:
            return _families.weight(self, name)  # dequantized with its block scales
        return self.weights.get(name)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: ids (T,) long -> (T, h) fp32. Ids outside this rank's rows give zeros."""
        table = self.weights["model.embed_tokens.weight"]
        start, stop = self.spec["model.embed_tokens.weight"].shard_ranges(self.slot.tp_rank, self.slot.degree)[0]
        inside = (ids >= start) & (ids < stop)
        x = table[torch.where(inside, ids - start, 0)].float() * inside[:, None]
        return self.all_reduce(x)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel LM head: x (n, h) fp32 -> logits (n, V) fp32 (all-gathered, padding rows dropped)."""
        name = "model.embed_tokens.weight" if self.dims["tied"] else "lm_head.weight"
        local = linear(x, self.weights[name]).contiguous()                    # (n, Vp / degree)
        if self.group is not None:
            parts = [torch.empty_like(local) for _ in range(self.slot.degree)]
            dist.all_gather(parts, local, group=self.group)
            # new_group orders its ranks by global rank; the vocabulary is in TP-rank order.
            local = torch.cat(self.instance.to_tp_order(parts), dim=-1)
        return local[:, : self.dims["vocab"]]

    def attention(self, li: int, x: torch.Tensor, positions: torch.Tensor, batch: list) -> torch.Tensor:
        """x (T, h) -> (T, h): QKV (column-parallel), rotary, paged causal attention per sequence, o_proj
        (row-parallel, all-reduced). batch: [(table (long), slice of x, start position)] per sequence."""
        if self.family.mla is not None:
            return _families.mla_attention(self, li, x, positions, batch)
        p, d = f"model.layers.{li}.self_attn.", self.dims["head_dim"]
        qkv = linear(x, self.w(p + "qkv_proj.weight"), self.w(p + "qkv_proj.bias"))
        hq = self.dims["heads"] // self.slot.degree
        hkv = self.layout.local_heads(self.slot.degree)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = q.reshape(-1, hq, d), k.reshape(-1, hkv, d)
        if self.family.qk_norm:
            q, k = _families.qk_norms(self, p, q, k)
        inv_freq = self.model.model.rotary_emb.inv_freq
        q = rotary(q, positions, self.theta, inv_freq)
        k = rotary(k, positions, self.theta, inv_freq)
        v = v.reshape(-1, hkv, d)
        out = torch.empty_like(q)
        layer = self.layers[li]
        for table, span, start in batch:
            kv_write(self.layout, layer, table, positions[span], k[span], v[span])
            kc, vc = kv_read(self.layout, layer, table, start + span.stop - span.start)
            out[span] = attend(q[span], kc, vc, positions[span])
        o = linear(out.reshape(-1, hq * d), self.w(p + "o_proj.weight"))
        bias = self.w(p + "o_proj.bias")
        if bias is not None and self.slot.tp_rank == 0:
            o = o + bias.float()                      # a row-parallel bias is added once per instance
        return self.all_reduce(o)

    def mlp(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: gate_up (merged column-parallel, [gate; up]) -> silu(gate) * up -> down (row-parallel)."""
        if self.family.is_moe_layer(li):
            return _families.moe_mlp(self, li, x)
        p = f"model.layers.{li}.mlp."
        gate, up = linear(x, self.w(p + "gate_up_proj.weight")).chunk(2, dim=-1)
        return self.all_reduce(linear(F.silu(gate) * up, self.w(p + "down_proj.weight")))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: list) -> torch.Tensor:
        """One step over a flattened batch: ids, positions (T,) long -> logits (len(batch), V) fp32 of each
        sequence's last token. Writes the K/V of every token into the cache."""
        x = self.embed(ids)
        for li in range(self.dims["layers"]):
            p = f"model.layers.{li}."
            x = x + self.attention(li, rms_norm(x, self.w(p + "input_layernorm.weight"), self.eps), positions, batch)
            x = x + self.mlp(li, rms_norm(x, self.w(p + "post_attention_layernorm.weight"), self.eps))
        x = rms_norm(x, self.w("model.norm.weight"), self.eps)
        last = torch.tensor([span.stop - 1 for _, span, _ in batch])
        return self.lm_head(x[last])

    # ---- scheduler ---------------------------------------------------------------------------------------------
    def _lifetime_blocks(self, seq_id: int) -> int:
        seq = self.seqs[seq_id]
        return -(-(len(seq.prompt) + seq.max_new_tokens - 1) // self.layout.block_size)

    def running(self) -> List[int]:
        return [s for s in self.owned if self.seqs[s].status == "running"]

    def unfinished(self) -> int:
        return sum(self.seqs[s].status != "finished" for s in self.owned)

    def arrived(self, s: int, now: Optional[int]) -> bool:
        return now is None or self.seqs[s].arrival <= now

    def step(self, now: Optional[int] = None) -> None:
        """One continuous-batching step: decode one token for every running sequence and prefill the waiting ones
        whose whole lifetime fits in the free blocks (a cached prompt prefix is reused, not computed); greedy
        sampling; finished sequences release their blocks (full prompt blocks stay in the prefix cache).
        now: the step number (requests that arrive later are not admitted yet); None: everything has arrived."""
        running, B, blocks = self.running(), self.layout.block_size, self.blocks
        # Preemption (by recompute, as vLLM does): if the decodes need more new blocks than are available (after
        # a split gave this instance less room than its sequences will grow into), the last running sequences
        # release their blocks and wait; re-admitted, they prefill prompt + generated tokens again.
        while sum(self.seqs[s].kv_len == len(self.tables[s]) * B for s in running) > blocks.available():
            victim = running.pop()
            self.preemptions += 1
            self.seqs[victim].status = "waiting"
            blocks.release(victim)
        items = [(s, [self.seqs[s].generated[-1]], self.seqs[s].kv_len) for s in running]
        # Admission: a prompt starts only if its whole lifetime fits beside what running sequences will need.
        free = blocks.available() - sum(self._lifetime_blocks(s) - len(self.tables[s]) for s in running)
        prefills = set()
        for s in self.owned:
            seq = self.seqs[s]
            if seq.status == "waiting" and self.arrived(s, now):
                tokens = list(seq.prompt) + list(seq.generated)
                prefix = blocks.cached_prefix(tokens)
                need = self._lifetime_blocks(s) - len(prefix) + blocks.pinned_evictable(prefix)
                if need <= free:
                    seq.status, free = "running", free - need
                    blocks.start(s, prefix)
                    items.append((s, tokens[len(prefix) * B:], len(prefix) * B))
                    prefills.add(s)
        if not items:
            waiting = [s for s in self.owned if self.seqs[s].status == "waiting" and self.arrived(s, now)]
            capacity = self.num_blocks - self.layout.reserved_blocks
            if self.strict_capacity and waiting and min(self._lifetime_blocks(s) for s in waiting) > capacity:
                raise CapacityError(f"rank {self.rank}: sequence {waiting[0]} needs more KV blocks than the "
                                    f"{capacity} of its instance; raise num_blocks")
            return
        ids, positions, batch, n = [], [], [], 0
        for s, toks, start in items:
            table = blocks.grow(s, start + len(toks), self.rank)
            ids += toks
            positions += range(start, start + len(toks))
            batch.append((torch.tensor(table, dtype=torch.long), slice(n, n + len(toks)), start))
            n += len(toks)
        logits = self.forward(torch.tensor(ids), torch.tensor(positions), batch)
        for (s, _, _), row in zip(items, logits):
            seq = self.seqs[s]
            if s in prefills:
                blocks.register(s, seq.prompt)  # its full prompt blocks join the prefix cache
            if self.record_logits and self.slot.tp_rank == 0:
                self.logits.setdefault(s, {})[len(seq.generated)] = row.clone()
            seq.generated.append(int(row.argmax()))
            if len(seq.generated) >= seq.max_new_tokens:
                seq.status = "finished"
                blocks.release(s)

    # ---- metadata and TP changes -----------------------------------------------------------------------------
    def sync_metadata(self) -> None:
        """Collective over the default group: every rank learns the current state of every sequence."""
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {s: self.seqs[s] for s in self.owned})
        for part in gathered:
            self.seqs.update(part)

    def change_degree(self, new_degree: int, scratch_bytes: int, placement: Optional[TPConfig] = None,
                      checkpoint: Optional[Mapping[str, torch.Tensor]] = None):
        """Collective over the default group: move this instance's weights, live KV blocks and prefix cache to
        `new_degree` with amoeba_core.retp, then adopt the result (adopt(): the integration checklist). Only the
        instance's scheduler rank passes block tables and the prefix-cache index; the others pass None. Sequences
        not yet admitted are dealt round-robin (by id) over the new instances.

        Returns the RetpResult, or the RetpFailure when the transformation failed: the engine then serves on at
        the old configuration. Before moving began (RetpAborted) nothing changed. After (TransformationFailed),
        recover() reloads the damaged shards from `checkpoint` (name -> full tensor), recomputes the sequences
        whose KV cache did not survive and drops the cached blocks that did not."""
        self.sync_metadata()
        tables = cached = None
        if self.is_scheduler_rank:
            tables = {s: list(self.tables[s]) for s in self.running()}
            cached = dict(self.blocks.index)
        if self.pool is not None:
            self.layers = None  # a split unmaps the pool's tail: no view of it may outlive the call
            memory = dict(pool=self.pool)
        else:
            memory = dict(buffers=self.kv_buffers)
        kv = KVCache(self.layout, num_blocks=self.num_blocks, sequences=tables, cached_blocks=cached, **memory)
        self.weights = None  # the module holds the shards; another reference would keep old ones alive in retp
        failure = None
        try:
            res = retp(None, new_degree, config=self.tp, specs=self.specs, weights=self.model, kv=kv,
                       placement=placement, scratch_bytes=scratch_bytes)
        except RetpAborted as e:
            self.weights = module_weights(self.model, self.specs)
            self._reattach_layers()
            return e
        except TransformationFailed as e:
            self.weights = module_weights(self.model, self.specs)
            if checkpoint is None:
                raise
            failure = e
        if failure is not None:
            del kv  # recover outside the except block: nothing of the failed call may still view the pool
            self.recover(failure.damage, checkpoint)
            return failure
        self.adopt(res)
        return res

    def adopt(self, res) -> None:
        """After a successful retp, every step of the checklist (docs/INTEGRATION.md), from the public result only."""
        # 1. Process group of the new instance, members in TP-rank order (every rank builds every instance's).
        # 2. Weights: retp rebound the module's parameters in place; refresh the name -> shard view.
        self.weights = module_weights(self.model, self.specs)
        # 3. KV views: the new tensors over the same (or resized) memory; keep every byte for the next call.
        if self.pool is None:
            self.kv_buffers = res.kv.buffers
        # 4. Block manager: pool size, block tables, free list; 5. prefix-cache index (new block ids).
        self.blocks.reset(res.kv.num_blocks, res.kv.block_tables, res.kv.cached_blocks)
        # 6. Scheduler: the sequences of this instance (their sampling state travels in SeqState, shared by
        #    sync_metadata); waiting ones are dealt round-robin.
        inst = res.slot.instance
        waiting = sorted(s for s, q in self.seqs.items() if q.status == "waiting")
        self.owned = sorted([s for s, dest in res.kv.destinations.items() if dest == inst] +
                            [s for j, s in enumerate(waiting) if j % res.config.num_instances == inst])
        # 7. CUDA graphs: none here (the reference engine runs eagerly); an engine recaptures them now.
        self._adopt_config(res.config, res.kv.layers, res.kv.num_blocks)

    def _reattach_layers(self) -> None:
        """The KV views of the current configuration again (after a retp that did not change it)."""
        if self.pool is not None and self.layers is None:
            self.layers = self.pool.layers(self.num_blocks, self.tp.degree)

    def instance_view(self, now: float):
        """This rank's instance for the TP policy (amoeba_core.policy.InstanceState): usable blocks, blocks held,
        running and (arrived) waiting requests with their lengths."""
        from ..policy import InstanceState, RequestView
        B = self.layout.block_size

        def view(s):
            q = self.seqs[s]
            return RequestView(s, len(q.prompt), len(q.generated), q.max_new_tokens,
                               None if q.status == "running" else float(q.arrival))
        running = [s for s in self.owned if self.seqs[s].status == "running"]
        waiting = [s for s in self.owned if self.seqs[s].status == "waiting" and self.arrived(s, now)]
        used = sum(-(-self.seqs[s].kv_len // B) for s in running)
        return InstanceState(self.slot.instance, tuple(self.tp.instances()[self.slot.instance]),
                             self.num_blocks - self.layout.reserved_blocks, used, tuple(view(s) for s in running),
                             tuple(view(s) for s in waiting), self.formed_at)

    def recover(self, damage, checkpoint: Mapping[str, torch.Tensor]) -> dict:
        """Back to serving at the old configuration after a TransformationFailed (its DamageReport `damage`, the
        same on every rank): reload every weight shard that is not intact at the old degree with shard() of the
        checkpoint tensor, and preempt (recompute later) every running sequence whose KV cache is not intact at
        its old instance. Sequences whose cache survived keep running on their old blocks."""
        # An elastic pool goes back to the old configuration's mapping: shrunk before the shards are reloaded (a
        # failed merge had grown it), grown after (a failed split had shrunk it), so memory never overshoots.
        pool_bytes = self.pool.bytes_for_blocks(self.num_blocks, self.tp.degree) if self.pool is not None else None
        if pool_bytes is not None and pool_bytes < self.pool.mapped_buffer_bytes:
            self.pool.resize(pool_bytes)
        restored = damage.weights_to_restore(self.rank, target="old")
        for name in restored:  # one at a time: each old shard is released before the next is loaded
            bind_weights(self.model, {name: shard(checkpoint[name], self.spec[name], self.slot.tp_rank,
                                                   self.slot.degree)})
        self.weights = module_weights(self.model, self.specs)
        if pool_bytes is not None and pool_bytes > self.pool.mapped_buffer_bytes:
            self.pool.resize(pool_bytes)
        lost = set(damage.sequences_lost(target="old"))
        recompute = [s for s in self.running() if s in lost]
        self._reattach_layers()
        for s in recompute:
            self.seqs[s].status = "waiting"
        tables = {s: t for s, t in self.tables.items() if s not in lost}
        # Cached blocks whose bytes a partial move may have overwritten leave the prefix cache.
        self.blocks.reset(self.num_blocks, tables, damage.cached_index(self.slot.instance, target="old"))
        self._adopt_config(self.tp, self.layers, self.num_blocks)
        return {"restored": restored, "recompute": recompute}


# The families beyond Llama (MoE, MLA, q/k norms, FP8) build on this module's math: imported last.
from . import families as _families  # noqa: E402
