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

    def _stage(self, key: str, messages):
        """Pinned host buffers for `messages` [(peer, device buffer)]: returns [(peer, host slice)]."""
        host = self._host_buffer(key, sum(t.numel() for _, t in messages))
        out, offset = [], 0
        for peer, t in messages:
            out.append((peer, host[offset:offset + t.numel()]))
            offset += t.numel()
        return out

    def exchange(self, sends, recvs) -> None:
        """Post every send and receive at once; return when all are done.

        sends, recvs: [(peer, buffer), ...] with contiguous uint8 buffers. Several messages to one peer are matched
        in list order, so both sides must list them in the same order (the plan does).
        """
        if not sends and not recvs:
            return
        send_bufs, recv_bufs = sends, recvs
        if self.stage_via_host:
            send_bufs, recv_bufs = self._stage("send", sends), self._stage("recv", recvs)
            for (_, h), (_, t) in zip(send_bufs, sends):
                h.copy_(t)
        ops = [dist.P2POp(dist.isend, t, self._global(p), self.group) for p, t in send_bufs]
        ops += [dist.P2POp(dist.irecv, t, self._global(p), self.group) for p, t in recv_bufs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if self.stage_via_host:
            for (_, t), (_, h) in zip(recvs, recv_bufs):
                t.copy_(h)
        self.bytes_sent += sum(t.numel() for _, t in sends)
        self.bytes_received += sum(t.numel() for _, t in recvs)
        self.messages += len(ops)
