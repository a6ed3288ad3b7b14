"""Typed exceptions. Every message names the offending values; every check runs before any byte moves."""


class AmoebaError(Exception):
    """Base class of every error amoeba_core raises on purpose."""


class InvalidDegreeError(AmoebaError, ValueError):
    """A TP degree that does not divide the world size, a head count, the vocabulary or a split unit."""


class ConfigError(AmoebaError, ValueError):
    """A TP configuration or model description that is malformed (ranks missing, instances of mixed size, ...)."""


class SpecMismatchError(AmoebaError, ValueError):
    """A tensor whose name, shape, dtype or device does not match its spec."""


class RankDisagreementError(AmoebaError, RuntimeError):
    """The ranks of the group were called with different specs, plans, dtypes or shapes."""


class CapacityError(AmoebaError, RuntimeError):
    """The live KV blocks of a new instance do not fit its pool."""


class ScratchBudgetError(AmoebaError, ValueError):
    """The scratch budget is too small to hold the smallest indivisible transfer unit."""


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
