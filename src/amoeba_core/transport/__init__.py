"""Transports move packed byte buffers between ranks; the executor never calls torch.distributed directly."""
from .torch_dist import TorchDistTransport

__all__ = ["TorchDistTransport"]
