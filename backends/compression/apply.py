"""Two ways to apply a compressor: a DDP communication hook per bucket, or a flat whole-model sync.

- ``hook``: DDP calls the hook for each gradient bucket during ``backward()``; the hook
  averages the bucket through ``GradientSync`` (or PyTorch's own hook) and DDP writes the
  result into ``param.grad``. Error-feedback state is kept per bucket, keyed by its parameters.
- ``flat``: the model is not wrapped in DDP; after ``backward()`` every gradient is flattened into
  one vector and synchronised once (A2SGD's "two scalars per worker per step" needs this).
"""


import time
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from backends.compression.base import CompressionConfig, Compressor, build_compressor, mode_of
from backends.compression.communicator import Communicator
from backends.compression.layout import ParameterPositions, bucket_key, carry_residual
from backends.compression.memory import Memory, ResidualMemory
from backends.compression.sync import GradientSync, Span, SyncStats, wait_device


class GradientApplier:
    """Synchronises a model's gradients each step and reports time and bytes."""

    mode: str
    overlapped = False  # whether comm_s runs concurrently with the backward computation

    def __init__(self, compressor: Compressor, communicator: Communicator) -> None:
        self.compressor = compressor
        self.communicator = communicator
        self.stats = SyncStats()

    def after_backward(self, model: torch.nn.Module) -> None:
        """Called once per step after ``backward()`` and before the optimizer."""

    def take_stats(self) -> SyncStats:
        """Time and bytes since the last call."""
        stats, self.stats = self.stats, SyncStats()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """This rank's compressor and error-feedback state."""
        return {"compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.compressor.load_state_dict(state.get("compressor", {}))


class _SyncApplier(GradientApplier):
    """Shared by the flat and hook paths: a GradientSync and its error-feedback memory."""

    def __init__(self, compressor: Compressor, communicator: Communicator) -> None:
        super().__init__(compressor, communicator)
        self.sync = GradientSync(compressor, communicator)

    @property
    def memory(self) -> Memory:
        """The error-feedback memory."""
        return self.sync.memory

    def take_stats(self) -> SyncStats:
        """Sync stats plus this applier's own flatten/unflatten time."""
        stats = super().take_stats()
        stats.add(self.sync.take_stats())
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Compressor state and residuals."""
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore compressor state and residuals."""
        super().load_state_dict(state)
        self.memory.load_state_dict(state.get("memory", {}))


class FlatApplier(_SyncApplier):
    """Flattens all gradients, syncs them once, writes them back."""

    mode = "flat"

    def after_backward(self, model: torch.nn.Module) -> None:
        """One sync of the whole model's gradient (missing gradients count as zeros)."""
        params = [p for p in model.parameters() if p.requires_grad]
        start = time.perf_counter()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        wait_device(flat.device)  # on a GPU the copies run after they are queued: time them, not the queueing
        self.stats.compress_s += time.perf_counter() - start
        averaged = self.sync.sync("model", flat)
        start = time.perf_counter()
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(averaged[offset : offset + n].view_as(p))
            offset += n
        wait_device(flat.device)
        self.stats.decompress_s += time.perf_counter() - start


class HookApplier(_SyncApplier):
    """A DDP communication hook that averages each bucket through GradientSync."""

    mode = "hook"

    def __init__(self, compressor: Compressor, communicator: Communicator, model: DistributedDataParallel):
        super().__init__(compressor, communicator)
        # Error feedback is keyed by the bucket's parameters (by position in the model), not by
        # bucket index, and follows them when DDP changes its buckets (backends/compression/layout.py).
        parameters = ParameterPositions(model.module)

        def hook(_state: Any, bucket) -> torch.futures.Future[torch.Tensor]:
            positions = parameters.of(bucket)
            if isinstance(self.memory, ResidualMemory):
                name = carry_residual(self.memory.residuals, positions, parameters.sizes)
            else:
                name = bucket_key(positions)
            result = self.sync.sync(name, bucket.buffer())
            fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            fut.set_result(result)
            return fut

        model.register_comm_hook(None, hook)


class NativeHookApplier(GradientApplier):
    """PyTorch's own asynchronous DDP hook of a compressor (dense, fp16, PowerSGD): buckets are
    communicated while backward still computes, as DDP users run it.

    Timing: ``compress_s`` is the host time spent inside the hook calls on the backward thread;
    ``comm_s`` is the span from the first bucket's hook call to the last bucket's completion in
    the step, overlapping the backward computation (``overlapped``). On a GPU the span is taken
    with CUDA events: NCCL's futures complete (and run their callbacks) when the collective is
    enqueued, so the end mark is an event recorded in the completion callback, whose stream waits
    for the collective; the span then covers PowerSGD's compression kernels too, which run between
    its all-reduces."""

    mode = "hook"
    overlapped = True

    def __init__(self, compressor: Compressor, communicator: Communicator, model: DistributedDataParallel):
        super().__init__(compressor, communicator)
        self.span = Span()
        state, native = compressor.make_ddp_hook(communicator, ParameterPositions(model.module))

        def hook(hook_state: Any, bucket) -> torch.futures.Future[torch.Tensor]:
            start = time.perf_counter()
            device = bucket.buffer().device
            self.span.mark(device)
            fut = native(hook_state, bucket)
            counts = communicator.take_counts()
            self.stats.add(SyncStats(time.perf_counter() - start, 0.0, 0.0, counts.sent, counts.recv, counts.payload))

            def done(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
                self.span.mark(device)
                return f.value()

            return fut.then(done)

        model.register_comm_hook(state, hook)

    def take_stats(self) -> SyncStats:
        """Stats since the last call, with the communication span of the buckets completed."""
        self.stats.comm_s += self.span.take()
        return super().take_stats()


def build_applier(
    config: CompressionConfig,
    model: torch.nn.Module,
    group: torch.distributed.ProcessGroup | None = None,
    seed: int = 0,
) -> GradientApplier:
    """The applier for ``config`` on ``model`` (DDP-wrapped for hook mode, plain for flat)."""
    communicator = Communicator(group)
    compressor = build_compressor(config, communicator.rank, seed)
    mode = mode_of(config)
    is_ddp = isinstance(model, DistributedDataParallel)
    if mode == "flat" and compressor.hook_only:
        raise ValueError(f"compressor {compressor.name!r} runs only as a DDP hook; use mode: hook")
    if mode == "flat" and is_ddp:
        raise ValueError("flat mode needs a model that is not wrapped in DDP (it would all-reduce twice)")
    if not is_ddp:
        if compressor.hook_only:
            # Never swapped for another compressor: a trial named powersgd must measure PowerSGD.
            raise ValueError(f"compressor {compressor.name!r} runs only as a DDP hook: wrap the model in DDP "
                             "(one worker too)")
        return FlatApplier(compressor, communicator)
    if compressor.native_hook:
        return NativeHookApplier(compressor, communicator, model)
    return HookApplier(compressor, communicator, model)
