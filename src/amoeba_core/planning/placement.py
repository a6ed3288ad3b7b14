"""Choosing which group rank takes which slot of the new configuration."""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..config import TPConfig
from ..errors import ConfigError


def new_slots(world_size: int, new_degree: int) -> list:
    """Slots of the new configuration in a fixed order: slot s = (instance s // degree, tp rank s % degree)."""
    return [(s // new_degree, s % new_degree) for s in range(world_size)]


def best_placement(gain: np.ndarray, new_degree: int, allowed: Optional[np.ndarray] = None) -> TPConfig:
    """The placement that maximises the total retained bytes.

    gain: (world, world) int64; gain[g, s] = bytes group rank g already holds and would still need in slot s
          (slot order of new_slots()). Ties go to keeping ranks in place (rank g in slot g), which makes the
          default contiguous layout win whenever it is optimal.
    allowed: optional (world, world // new_degree) bool: group rank g may serve new instance d (the rank
          constraints of planning.kv_destinations); the best placement among those that respect it.
    """
    world = gain.shape[0]
    if gain.shape != (world, world):
        raise ConfigError(f"gain matrix must be square, got {gain.shape}")
    # Scale so that the tie-break (at most `world` in total) never outweighs a single byte of gain.
    score = gain.astype(np.float64) * (world + 1) + np.eye(world)
    if score.max() >= 2 ** 53:
        score = gain.astype(np.float64) + np.eye(world) * 0.5 / world  # bytes beyond 2**53/65: tie-break weaker
    if allowed is not None:
        score = np.where(np.repeat(allowed, new_degree, axis=1), score, -np.inf)  # forbidden cells
    try:
        rows, cols = linear_sum_assignment(score, maximize=True)
    except ValueError:
        raise ConfigError("no placement satisfies the rank constraints of the KV destinations") from None
    slots = new_slots(world, new_degree)
    return TPConfig(new_degree, tuple(slots[cols[g]] for g in rows))


def placement_gain(placement: TPConfig, gain: np.ndarray) -> int:
    """Retained bytes of a placement under a gain matrix."""
    return int(sum(gain[g, inst * placement.degree + tp] for g, (inst, tp) in enumerate(placement.slots)))
