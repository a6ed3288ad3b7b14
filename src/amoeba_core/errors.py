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
