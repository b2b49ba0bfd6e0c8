"""Collectives over torch.distributed, with per-worker byte counts from the real payloads.

Counting model (per worker, per collective, B = bytes of this worker's payload tensor,
p = workers):
- all-reduce is counted as a ring all-reduce (reduce-scatter then all-gather): each worker
  sends and receives 2(p-1)/p x B (rounded to whole bytes);
- all-gather: each worker's B reaches the p-1 others and it receives their B each:
  (p-1) x B sent and (p-1) x B received;
- p = 1 moves nothing.
These are the bandwidth terms of the standard ring/direct algorithms; what NCCL or gloo
actually chooses (trees, in-place tricks, headers) is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one worker sends (and receives) in a ring all-reduce of ``payload_bytes``."""
    if world_size <= 1:
        return 0
    return round(2 * (world_size - 1) * payload_bytes / world_size)


def allgather_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one worker sends (and receives) in an all-gather of ``payload_bytes`` each."""
    return max(world_size - 1, 0) * payload_bytes


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return tensor.numel() * tensor.element_size()


@dataclass
class ByteCount:
    """Bytes one worker sent and received, plus the payload it contributed."""

    sent: int = 0
    recv: int = 0
    payload: int = 0

    def add(self, sent: int, recv: int, payload: int) -> None:
        """Accumulate one collective's counts."""
        self.sent += sent
        self.recv += recv
        self.payload += payload


class Communicator:
    """Runs all-reduce (sum) and all-gather on a process group and counts bytes."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.counts = ByteCount()

    def allreduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over workers (in place) and count ring all-reduce bytes."""
        for tensor in tensors:
            nbytes = tensor_bytes(tensor)
            moved = ring_allreduce_bytes(nbytes, self.world_size)
            self.counts.add(moved, moved, nbytes)
            if self.world_size > 1:
                dist.all_reduce(tensor, group=self.group)
        return tensors

    def allgather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Gather every worker's tensors; returns one payload list per rank."""
        gathered: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for tensor in tensors:
            nbytes = tensor_bytes(tensor)
            moved = allgather_bytes(nbytes, self.world_size)
            self.counts.add(moved, moved, nbytes)
            if self.world_size > 1:
                parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
                dist.all_gather(parts, tensor.contiguous(), group=self.group)
            else:
                parts = [tensor]
            for rank, part in enumerate(parts):
                gathered[rank].append(part)
        return gathered

    def count_external_allreduce(self, payload_bytes: int) -> None:
        """Count an all-reduce that a foreign hook (PowerSGD) ran on tensors of ``payload_bytes``."""
        moved = ring_allreduce_bytes(payload_bytes, self.world_size)
        self.counts.add(moved, moved, payload_bytes)

    def take_counts(self) -> ByteCount:
        """Return the counts since the last call and start afresh."""
        counts, self.counts = self.counts, ByteCount()
        return counts
