"""amoeba_core: change the tensor-parallel degree of a running LLM inference service in place.

    plan = plan_retp(old_config, new_degree, specs)           # pure: printable, testable, no process group
    result = retp(group, new_degree, config=..., specs=..., weights=...)   # on every rank of the group
"""
from . import _C
from .api import RetpResult, RetpStats, retp
from .config import RankSlot, TPConfig
from .elastic import ElasticKVPool, ElasticRegion, elastic_memory_stats, reset_elastic_peak
from .errors import (AmoebaError, CapacityError, ConfigError, ElasticLeaseError, ElasticLimitError, ElasticMapError,
                     ElasticMemoryError, InvalidDegreeError, RankDisagreementError, RetpAborted, RetpFailure,
                     ScratchBudgetError, SpecMismatchError, TransformationFailed)
from .layout import ParamSpec, Section, fp8_block_specs, llama_param_specs, model_param_specs, shard
from .planning import DEFAULT_SCRATCH_BYTES, RetpPlan, plan_retp

__version__ = "0.1.0"


def build_info() -> dict:
    """What the extension was built with."""
    return {"cuda_compiled": bool(_C.cuda_compiled), "box_fields": _C.BOX_FIELDS}


__all__ = ["retp", "plan_retp", "RetpPlan", "RetpResult", "RetpStats", "TPConfig", "RankSlot", "ParamSpec",
           "Section", "llama_param_specs", "model_param_specs", "fp8_block_specs", "shard", "DEFAULT_SCRATCH_BYTES",
           "AmoebaError", "CapacityError", "ConfigError", "InvalidDegreeError", "RankDisagreementError", "ScratchBudgetError", "SpecMismatchError",
           "build_info", "ElasticRegion", "ElasticKVPool", "elastic_memory_stats", "reset_elastic_peak",
           "ElasticMemoryError", "ElasticLimitError", "ElasticMapError", "ElasticLeaseError", "RetpFailure",
           "RetpAborted", "TransformationFailed"]
