"""What an engine needs around retp: its model as an nn.Module, and its instances' process groups afterwards.

    result = retp_module(group, new_degree, model, config=config, specs=specs, kv=kv)   # or retp(..., weights=model)
    mine = instance_groups(result.config, group)           # every rank, same order: this rank's new instance group

retp_module takes the engine's nn.Module whose parameters (or buffers) carry the specs' names (vLLM's fused names,
e.g. model.layers.0.self_attn.qkv_proj.weight), moves them with retp and rebinds the new shards in place as
nn.Parameters (requires_grad preserved; tied parameters, one Parameter under several names, rebound under every
name). Buffers that no spec names (a rotary inv_freq, cos/sin caches) are left alone; a parameter that no spec
names raises SpecMismatchError, because it would silently stay at the old degree, unless `ignore` names it.

instance_groups builds the process group of every instance of a TPConfig (torch.distributed.new_group, called by
every rank in instance order as torch requires) and returns this rank's, with its members in TP-rank order:
new_group orders a group's ranks by global rank, and a placement may put an instance on non-consecutive or
permuted ranks (e.g. [[0, 2], [3, 1]]), so gathered results must be put back in TP-rank order (to_tp_order).
docs/INTEGRATION.md walks through an engine integration step by step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import TPConfig
from .errors import ConfigError, SpecMismatchError


# ---- modules ----------------------------------------------------------------------------------------------------
def _locations(module: nn.Module) -> Dict[int, List[Tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (owner module, attribute, "param" | "buffer") holding it (shared tensors included)."""
    out: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    for owner in module.modules():
        for kind, table in (("param", owner._parameters), ("buffer", owner._buffers)):
            for attr, t in table.items():
                if t is not None:
                    out.setdefault(id(t), []).append((owner, attr, kind))
    return out


def _find(module: nn.Module, name: str):
    """(owner, attribute, tensor, kind) of the parameter or buffer `name` (dotted), or None."""
    path, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return None
    if attr in owner._parameters and owner._parameters[attr] is not None:
        return owner, attr, owner._parameters[attr], "param"
    if attr in owner._buffers and owner._buffers[attr] is not None:
        return owner, attr, owner._buffers[attr], "buffer"
    return None


def module_weights(module: nn.Module, specs: Sequence, ignore: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """name -> the module's tensor (Parameter or buffer) for every spec, checked.

    SpecMismatchError when a spec names nothing in the module, or when the module has a parameter no spec names
    and `ignore` does not list it (such a parameter would stay at the old degree). Buffers no spec names are
    ignored."""
    ignore = set(ignore)
    out, missing = {}, []
    for spec in specs:
        found = _find(module, spec.name)
        if found is None:
            missing.append(spec.name)
        else:
            out[spec.name] = found[2]
    if missing:
        raise SpecMismatchError(f"the module has no parameter or buffer for specs {missing[:5]}"
                                f"{'...' if len(missing) > 5 else ''} (spec names must be the module's dotted "
                                f"names, e.g. from named_parameters())")
    owned = {id(t) for t in out.values()}
    unknown = [name for name, p in module.named_parameters() if id(p) not in owned and name not in ignore]
    if unknown:
        raise SpecMismatchError(f"the module has parameters no spec describes: {unknown[:5]}"
                                f"{'...' if len(unknown) > 5 else ''}; they would keep the old degree's shape. "
                                f"Describe them with specs, or pass ignore=[...] if the engine reshards them itself")
    return out


def bind_weights(module: nn.Module, weights: Dict[str, torch.Tensor],
                 requires_grad: Optional[Dict[str, bool]] = None) -> None:
    """Put `weights` (name -> tensor) into the module in place of what it holds under those names (and under
    every other name sharing that tensor): parameters as new nn.Parameters (requires_grad from `requires_grad`,
    else the old parameter's; the same storage, no copy), buffers as buffers. E.g. after a failed retp, the
    shards reloaded from the checkpoint."""
    where = _locations(module)
    for name, tensor in weights.items():
        found = _find(module, name)
        if found is None:
            raise SpecMismatchError(f"the module has no parameter or buffer named {name!r}")
        owner, attr, old, kind = found
        places = where.get(id(old), [(owner, attr, kind)])
        _bind(places, tensor, kind, (requires_grad or {}).get(name, old.requires_grad))


def _bind(places, tensor: torch.Tensor, kind: str, requires_grad: bool) -> None:
    if kind == "param":
        value = tensor if isinstance(tensor, nn.Parameter) and tensor.requires_grad == requires_grad else \
            nn.Parameter(tensor.detach(), requires_grad=requires_grad)
    else:
        value = tensor.detach()
    for owner, attr, k in places:
        (owner._parameters if k == "param" else owner._buffers)[attr] = value


def retp_module(group, new_degree: int, module: nn.Module, *, specs: Sequence, ignore: Iterable[str] = (),
                **retp_kwargs):
    """retp with the engine's model: moves the module's tensors named by `specs` and rebinds the new shards in
    place (module_weights / bind_weights). Returns the RetpResult (result.weights: name -> new shard, the same
    tensors the module now holds). The module holds no reference to its sharded tensors during the call, so
    retp can release old shards as it goes (keep no other references either). If retp raises, the module gets
    back what the weights dict holds at that point (RetpAborted: the unchanged shards; TransformationFailed: see
    the DamageReport, then bind_weights the reloaded ones)."""
    from .api import retp
    try:
        tensors = module_weights(module, specs, ignore)
    except SpecMismatchError as e:  # inside retp's validate phase, so that every rank raises it, not this one
        return retp(group, new_degree, specs=specs, weights=_Unusable(e), **retp_kwargs)
    where = _locations(module)
    state = {}
    for name, t in tensors.items():
        _, _, _, kind = _find(module, name)
        state[name] = (where[id(t)], kind, t.requires_grad)
    weights = {name: t.detach() for name, t in tensors.items()}  # plain tensors: retp writes some in place
    del tensors
    for places, kind, _ in state.values():  # let go of the old shards: retp frees them as it goes
        for owner, attr, k in places:
            (owner._parameters if k == "param" else owner._buffers)[attr] = None
    try:
        return retp(group, new_degree, specs=specs, weights=weights, **retp_kwargs)
    finally:
        for name, (places, kind, requires_grad) in state.items():
            _bind(places, weights[name], kind, requires_grad)
            if kind == "param":
                weights[name] = places[0][0]._parameters[places[0][1]]


class _Unusable(dict):
    """A weights dict that raises `error` when retp first looks into it (its validate phase)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def __contains__(self, name):
        raise self.error

    def __iter__(self):
        raise self.error


# ---- process groups -------------------------------------------------------------------------------------------
@dataclass
class InstanceGroup:
    """This rank's instance after a retp.

    group:        its torch.distributed process group (None at degree 1: nothing to communicate)
    ranks:        its ranks in the parent group, in TP-rank order (result.config.instances()[instance])
    global_ranks: the same as global ranks (what new_group took)
    instance, tp_rank, degree: this rank's slot
    """

    group: Optional[object]
    ranks: List[int]
    global_ranks: List[int]
    instance: int
    tp_rank: int
    degree: int

    @property
    def member_of_tp(self) -> List[int]:
        """member_of_tp[t] = index in the process group (its group rank) of TP rank t: new_group numbers its
        members in global-rank order."""
        order = sorted(self.global_ranks)
        return [order.index(g) for g in self.global_ranks]

    def to_tp_order(self, gathered: Sequence) -> list:
        """Results of a collective over `group` (indexed by group rank, e.g. all_gather's list) in TP-rank order."""
        return [gathered[m] for m in self.member_of_tp]


_GROUPS: Dict[tuple, object] = {}
_GROUPS_WORLD: List[object] = [None]


def instance_groups(config: TPConfig, group=None, backend: Optional[str] = None) -> Optional[InstanceGroup]:
    """This rank's InstanceGroup in `config`, building every instance's process group that does not exist yet.

    `group`: the group config describes (None: the default group; config's ranks are ranks of `group`), as a
    process group or as the list of its global ranks (in group-rank order; what a rank outside it can pass). Call on
    every rank of the default group with the same arguments: torch.distributed.new_group must be called by every
    rank of the default group, in the same order, also for groups it is not in; instances are created here in
    instance order. Ranks outside `group` get None. backend: "gloo", "nccl" or None (the default group's). Groups
    are cached by (backend, member set), so a configuration seen before (or an instance whose members recur in
    another order) reuses its group."""
    if not dist.is_initialized():
        raise ConfigError("instance_groups needs an initialised default process group")
    if _GROUPS_WORLD[0] is not dist.group.WORLD:  # a new default group: subgroups of the old one are void
        _GROUPS.clear()
        _GROUPS_WORLD[0] = dist.group.WORLD
    if group is None:
        parent_ranks = list(range(dist.get_world_size()))
    elif isinstance(group, (list, tuple, range)):
        parent_ranks = [int(g) for g in group]
    else:
        try:
            parent_ranks = dist.get_process_group_ranks(group)  # group rank -> global rank
        except Exception:  # noqa: BLE001 - torch raises several types for a group this rank is not in
            raise ConfigError("this rank is not in `group`: pass the group's global ranks (a list) instead of the "
                              "process group object") from None
    if len(parent_ranks) != config.world_size:
        raise ConfigError(f"config covers {config.world_size} ranks but the group has {len(parent_ranks)}")
    key_backend = backend or dist.get_backend()
    mine = None
    me = parent_ranks.index(dist.get_rank()) if dist.get_rank() in parent_ranks else -1
    slot = config.slot(me) if me >= 0 else None
    for inst, ranks in enumerate(config.instances()):
        members = tuple(sorted(parent_ranks[r] for r in ranks))
        key = (key_backend, members)
        if len(members) > 1 and key not in _GROUPS:
            _GROUPS[key] = dist.new_group(list(members), backend=backend)
        if slot is not None and inst == slot.instance:
            mine = InstanceGroup(_GROUPS.get(key) if len(members) > 1 else None, list(ranks),
                                 [parent_ranks[r] for r in ranks], inst, slot.tp_rank, config.degree)
    return mine
