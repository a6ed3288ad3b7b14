"""Typed exceptions. Every message names the offending values.

Errors about the caller's input (InvalidDegreeError ... ScratchBudgetError) are raised on every rank of the group
before any byte moves. Failures that are not about the input derive from RetpFailure: RetpAborted when nothing has
moved (every byte of weights and KV is unchanged on every rank), TransformationFailed once moving had begun (it
carries a DamageReport saying exactly what each rank holds now).

Every AmoebaError that retp() raises also carries, where known:
  phase        the phase it arose in: "validate", "plan", "agree", "prepare", "move" or "confirm"
  failed_rank  the group rank whose error started it (None when no rank reported one, e.g. a timeout)
  cause        "<exception type>: <message>" of the original error on that rank
"""
from typing import Optional


class AmoebaError(Exception):
    """Base class of every error amoeba_core raises on purpose."""

    phase: Optional[str] = None
    failed_rank: Optional[int] = None
    cause: Optional[str] = None


class InvalidDegreeError(AmoebaError, ValueError):
    """A TP degree that does not divide the world size, a head count, the vocabulary or a split unit."""


class ConfigError(AmoebaError, ValueError):
    """A TP configuration or model description that is malformed (ranks missing, instances of mixed size, ...)."""


class SpecMismatchError(AmoebaError, ValueError):
    """A tensor whose name, shape, dtype, device or layout does not match its spec."""


class RankDisagreementError(AmoebaError, RuntimeError):
    """The ranks of the group were called with different specs, plans, dtypes, shapes or library builds."""


class CapacityError(AmoebaError, RuntimeError):
    """The live KV blocks of a new instance do not fit its pool."""


class ScratchBudgetError(AmoebaError, ValueError):
    """The scratch budget is too small to hold the smallest indivisible transfer unit."""


class RetpFailure(AmoebaError, RuntimeError):
    """A transformation failed for a reason other than bad input: an exception on some rank, a rank that died or
    stopped answering within timeout_s.

    unresponsive_ranks: ranks that neither finished nor reported an error within the timeout (dead or stuck).
    group_aborted:      the library aborted the process group's communicator (NCCL) to unblock this rank; the
                        group cannot be used again: destroy it and create a new one.
    """

    def __init__(self, message: str, *, phase: Optional[str] = None, failed_rank: Optional[int] = None,
                 cause: Optional[str] = None, unresponsive_ranks=(), group_aborted: bool = False):
        super().__init__(message)
        self.phase, self.failed_rank, self.cause = phase, failed_rank, cause
        self.unresponsive_ranks = tuple(unresponsive_ranks)
        self.group_aborted = group_aborted


class RetpAborted(RetpFailure):
    """The transformation failed before any byte moved: weights and KV are unchanged on every rank that raised it,
    and the caller can go on serving at the old configuration."""


class TransformationFailed(RetpFailure):
    """The transformation failed after moving had begun. `damage` (a DamageReport) says, for every rank that
    reported, which weight tensors are at the old degree, the new degree or partly overwritten, and for every
    sequence whether its KV cache is intact at its old instance, complete at its new one, or lost; `plan` is the
    RetpPlan that was being executed. See README "When things go wrong" for the recovery path."""

    def __init__(self, message: str, *, damage=None, plan=None, **kwargs):
        super().__init__(message, **kwargs)
        self.damage, self.plan = damage, plan


class ElasticMemoryError(AmoebaError, RuntimeError):
    """An elastic memory region or pool (amoeba_core.elastic) refused an operation; base of the three below."""


class ElasticLimitError(ElasticMemoryError, ValueError):
    """A request outside what an elastic region allows: above its reserved maximum, a view beyond the mapped prefix,
    a granularity that is not a multiple of the page / driver granularity, a closed region. Nothing was changed."""


class ElasticMapError(ElasticMemoryError):
    """The OS or the CUDA driver refused to reserve or map memory (out of memory, no VMM support, no driver). The
    message names the call, its error and the sizes; the region (for a pool: every region) is as it was before."""


class ElasticLeaseError(ElasticMemoryError):
    """Live tensor views reach bytes that a shrink or close would unmap. Nothing was changed: drop the views first."""
