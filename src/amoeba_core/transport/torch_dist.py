"""Point-to-point transport over a torch.distributed process group (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist


class TorchDistTransport:
    """One exchange per round: every rank posts all its sends and receives at once (batched isend/irecv).

    group:          the process group; peers are group ranks
    stage_via_host: copy CUDA buffers through pinned host memory (for gloo groups holding CUDA tensors, e.g.
                    several ranks on one GPU, where NCCL refuses); with NCCL leave False: no host round trip
    Counts the bytes it moves: bytes_sent / bytes_received (per rank, all rounds).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *, stage_via_host: bool = False):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.stage_via_host = stage_via_host
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self._host: Dict[str, torch.Tensor] = {}

    def _global(self, group_rank: int) -> int:
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _host_buffer(self, key: str, n: int) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._host[key] = buf
        return buf[:n]

    def exchange(self, sends, recvs) -> None:
        """Post every send and receive at once; return when all are done.

        sends, recvs: {peer: buffer} or [(peer, buffer), ...] with contiguous uint8 buffers. Several messages to
        one peer are matched in list order, so both sides must list them in the same order (the plan does).
        """
        sends = list(sends.items()) if isinstance(sends, dict) else list(sends)
        recvs = list(recvs.items()) if isinstance(recvs, dict) else list(recvs)
        if not sends and not recvs:
            return
        copies_back = []
        if self.stage_via_host:
            host_send = self._host_buffer("send", sum(t.numel() for _, t in sends))
            host_recv = self._host_buffer("recv", sum(t.numel() for _, t in recvs))
            staged_sends, offset = [], 0
            for peer, t in sends:
                h = host_send[offset:offset + t.numel()]
                h.copy_(t)
                staged_sends.append((peer, h))
                offset += t.numel()
            staged_recvs, offset = [], 0
            for peer, t in recvs:
                h = host_recv[offset:offset + t.numel()]
                staged_recvs.append((peer, h))
                copies_back.append((t, h))
                offset += t.numel()
            send_bufs, recv_bufs = staged_sends, staged_recvs
        else:
            send_bufs, recv_bufs = sends, recvs
        ops = [dist.P2POp(dist.isend, t, self._global(p), self.group) for p, t in send_bufs]
        ops += [dist.P2POp(dist.irecv, t, self._global(p), self.group) for p, t in recv_bufs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for dst, host in copies_back:
            dst.copy_(host)
        self.bytes_sent += sum(t.numel() for _, t in sends)
        self.bytes_received += sum(t.numel() for _, t in recvs)
        self.messages += len(ops)
