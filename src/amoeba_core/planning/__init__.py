"""Planning: pure functions from (old configuration, new degree, tensor descriptions) to a RetpPlan."""
from .placement import best_placement, new_slots, placement_gain
from .plan import DEFAULT_SCRATCH_BYTES, RetpPlan, plan_retp
from .weights import ALLOC, COMPACT, SAME, VIEW, LocalMove, TensorPlan, Transfer

__all__ = ["plan_retp", "RetpPlan", "DEFAULT_SCRATCH_BYTES", "best_placement", "new_slots", "placement_gain",
           "TensorPlan", "Transfer", "LocalMove", "SAME", "VIEW", "COMPACT", "ALLOC"]
