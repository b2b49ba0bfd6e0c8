"""One gradient synchronisation: compensate, compress, communicate, decompress, keep the residual."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from backends.compression.base import CompressContext, Compressor, error_feedback_enabled
from backends.compression.communicator import Communicator
from backends.compression.memory import Memory, ResidualMemory


@dataclass
class SyncStats:
    """Time and bytes of the syncs since the last ``take_stats``."""

    compress_s: float = 0.0
    comm_s: float = 0.0
    decompress_s: float = 0.0
    bytes_sent: int = 0
    bytes_recv: int = 0
    payload_bytes: int = 0

    def add(self, other: SyncStats) -> None:
        """Accumulate another window's stats."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def wait_device(device: torch.device) -> None:
    """Make wall-clock timings honest on asynchronous devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Span:
    """Time from the first ``mark`` to the last one: the wall clock on CPU; on CUDA, events
    recorded on the current stream, so the span is when the device reached the marks (work that
    is only enqueued when the host marks it is counted when it runs, not when it is queued)."""

    def __init__(self) -> None:
        self._first: float | torch.cuda.Event | None = None
        self._last: float | torch.cuda.Event | None = None

    @staticmethod
    def _now(device: torch.device) -> float | torch.cuda.Event:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def mark(self, device: torch.device) -> None:
        """A point of the span: the first call opens it, every later one moves its end."""
        if self._first is None:
            self._first = self._now(device)
        else:
            self._last = self._now(device)

    def take(self) -> float:
        """Seconds from the first to the last mark (0 with fewer than two), and start afresh."""
        first, last, self._first, self._last = self._first, self._last, None, None
        if first is None or last is None:
            return 0.0
        if isinstance(first, float) and isinstance(last, float):
            return max(last - first, 0.0)
        assert isinstance(first, torch.cuda.Event) and isinstance(last, torch.cuda.Event)
        first.synchronize()  # the marks may sit on different streams
        last.synchronize()
        return max(first.elapsed_time(last) / 1000.0, 0.0)


class GradientSync:
    """Averages a tensor over workers through a compressor, with optional error feedback."""

    def __init__(self, compressor: Compressor, communicator: Communicator, memory: Memory | None = None):
        self.compressor = compressor
        self.communicator = communicator
        if memory is None:
            memory = ResidualMemory() if error_feedback_enabled(compressor) else Memory()
        self.memory = memory
        self.stats = SyncStats()

    @property
    def world_size(self) -> int:
        """Workers in the communicator's group."""
        return self.communicator.world_size

    def _needs_local(self) -> bool:
        """Whether the residual is taken against this worker's own decoded payload."""
        return isinstance(self.memory, ResidualMemory) and self.compressor.residual_reference == "local"

    def sync(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return the compressed average over workers of ``tensor`` (keyed ``name`` for feedback)."""
        device = tensor.device
        t0 = time.perf_counter()
        compensated = self.memory.compensate(name, tensor)
        ctx = CompressContext(shape=tensor.shape, dtype=tensor.dtype, world_size=self.world_size)
        payload = self.compressor.compress(compensated, ctx)
        local = None
        if self._needs_local() and self.compressor.collective == "allreduce":
            # The all-reduce overwrites the payload, so decode our own copy first.
            local = self.compressor.decompress(
                [p.clone() for p in payload], dataclasses.replace(ctx, world_size=1)
            )
        wait_device(device)
        t1 = time.perf_counter()
        if self.compressor.collective == "allreduce":
            summed = self.communicator.allreduce(payload)
            wait_device(device)
            t2 = time.perf_counter()
            result = self.compressor.decompress(summed, ctx)
        else:
            gathered = self.communicator.allgather(payload)
            wait_device(device)
            t2 = time.perf_counter()
            decoded = [self.compressor.decompress(p, ctx) for p in gathered]
            if self._needs_local():
                local = decoded[self.communicator.rank]
            result = decoded[0].clone()
            for part in decoded[1:]:
                result.add_(part)
            result.div_(self.world_size)
        self.memory.update(name, compensated, result if local is None else local)
        wait_device(device)
        t3 = time.perf_counter()
        counts = self.communicator.take_counts()
        self.stats.add(SyncStats(t1 - t0, t2 - t1, t3 - t2, counts.sent, counts.recv, counts.payload))
        return result

    def take_stats(self) -> SyncStats:
        """Stats since the last call; starts afresh."""
        stats, self.stats = self.stats, SyncStats()
        return stats
