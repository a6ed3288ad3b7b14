"""The failure contract on NCCL (marked gpu; skipped without a GPU): a receive that would wait forever is given up
after timeout_s and the communicator is aborted, so the rank raises instead of hanging."""
import pytest
import torch

from amoeba_core import _C
from amoeba_core.launch import RankPool

import fault_fns

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(_C, "cuda_compiled", False)),
    reason="needs a CUDA device and the CUDA engine")]


def test_nccl_receive_that_never_completes_is_aborted():
    with RankPool(1, timeout_s=60, backend="nccl") as pool:
        (raised, seconds, aborted), = pool.run(fault_fns.nccl_stuck_receive, 2.0)
    assert raised == "ExchangeTimeout" and aborted, (raised, aborted)
    assert 1.9 <= seconds <= 10, seconds
