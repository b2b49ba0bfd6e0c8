"""PowerSGD through PyTorch's own DDP hook (Vogels et al., 2019), with byte counting.

PowerSGD interleaves collectives with compression (all-reduce P, orthogonalise, compute Q,
all-reduce Q), so it does not fit the compress -> one collective -> decompress shape; it runs
as PyTorch's ``powerSGD_hook`` and its bytes are counted from PyTorch's own tally of the
elements it hands to all-reduce (``PowerSGDState.total_numel_after_compression``: the P and Q
matrices plus the tensors it sends uncompressed), or the whole bucket before ``start_iter``.
"""


import threading
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from backends.compression.base import (
    COMPRESSORS,
    CompressContext,
    CompressionConfig,
    Compressor,
    Payload,
    error_feedback_enabled,
)
from backends.compression.communicator import Communicator
from backends.compression.layout import ParameterPositions, carry_residual


class _CudaWithCpuSafeSynchronize:
    """``torch.cuda``, except that ``synchronize`` on a device that is not a GPU does nothing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """torch.cuda.synchronize, a no-op for a CPU device."""
        if device is None or torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)


class _TorchForPowerSGDHook:
    """``torch`` as PyTorch's PowerSGD hook module sees it, with the ``torch.cuda`` above."""

    cuda = _CudaWithCpuSafeSynchronize()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def let_cpu_buckets_run_on_gpu_hosts() -> None:
    """PyTorch's ``powerSGD_hook`` calls ``torch.cuda.synchronize(the bucket's device)`` whenever
    CUDA is available, which raises for a CPU bucket ("Expected a cuda device, but got: cpu"): CPU
    training over gloo on a host with a GPU failed at its first step. The hook's module is given
    a ``torch`` whose synchronize skips non-GPU devices; everything else is torch itself."""
    if not isinstance(powersgd.torch, _TorchForPowerSGDHook):
        powersgd.torch = _TorchForPowerSGDHook()


@COMPRESSORS.register
class PowerSGDCompressor(Compressor):
    """Low-rank (rank r) gradient approximation; only as a DDP communication hook."""

    name = "powersgd"
    collective = "allreduce"
    default_error_feedback = True
    default_mode = "hook"
    native_hook = True
    hook_only = True
    one_bucket_backends = ("gloo",)

    def __init__(self, config: CompressionConfig, rank: int = 0, seed: int = 0) -> None:
        super().__init__(config, rank, seed)
        self.state: powersgd.PowerSGDState | None = None
        self._saved: dict[str, Any] | None = None
        # Error feedback by the bucket's parameters (layout.py), handed to PyTorch's per-index
        # error_dict before each bucket and taken back after: DDP's buckets differ between a
        # run's (or a restarted run's) first step and the later ones.
        self.residuals: dict[str, torch.Tensor] = {}
        self._layouts: dict[int, list[int]] = {}  # bucket index -> its parameters, in this process
        self._residuals_lock = threading.Lock()  # completion callbacks may run on the backend's threads

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """Not available: PowerSGD needs collectives between its compression steps."""
        raise NotImplementedError("powersgd runs only as a DDP hook (mode: hook)")

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Not available (see compress)."""
        raise NotImplementedError("powersgd runs only as a DDP hook (mode: hook)")

    def make_ddp_hook(self, communicator: Communicator, parameters: ParameterPositions):
        """PyTorch's PowerSGD state and a hook around ``powerSGD_hook`` that counts each bucket's
        bytes and keeps its error feedback by parameters."""
        let_cpu_buckets_run_on_gpu_hosts()
        self.state = powersgd.PowerSGDState(
            process_group=communicator.group,
            matrix_approximation_rank=self.config.rank,
            start_powerSGD_iter=self.config.start_iter,
            use_error_feedback=error_feedback_enabled(self),
            warm_start=True,
            random_seed=self.seed,
        )
        if self._saved is not None:
            self._restore(self._saved)

        def hook(state: powersgd.PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
            buffer, index, positions = bucket.buffer(), bucket.index(), parameters.of(bucket)
            compressing = state.iter >= state.start_powerSGD_iter
            if self._layouts.get(index) != positions:
                # Warm-start P and Q belong to the bucket's parameters: a new layout starts afresh.
                state.p_memory_dict.pop(index, None)
                state.q_memory_dict.pop(index, None)
                self._layouts[index] = positions
            key = None
            if state.use_error_feedback and compressing:
                with self._residuals_lock:
                    key = carry_residual(self.residuals, positions, parameters.sizes)
                    if key in self.residuals:
                        state.error_dict[index] = self.residuals[key]
                    else:
                        state.error_dict.pop(index, None)  # PyTorch starts it at zero
            before = state.total_numel_after_compression
            fut = powersgd.powerSGD_hook(state, bucket)
            numel = state.total_numel_after_compression - before if compressing else buffer.numel()
            communicator.count_external_allreduce(numel * buffer.element_size())
            if key is None:
                return fut

            def keep_residual(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
                with self._residuals_lock:
                    self.residuals[key] = state.error_dict[index]
                return f.value()

            return fut.then(keep_residual)

        return self.state, hook

    def state_dict(self) -> dict[str, Any]:
        """PowerSGD's state (iteration, RNG, ...) and the residuals by parameters; not its
        per-index error and warm-start memories, which a restarted run's buckets do not match."""
        if self.state is None:
            return self._saved or {}
        slots = {slot: getattr(self.state, slot) for slot in self.state.__slots__ if slot not in _PER_INDEX}
        return {"powersgd": slots, "residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore PowerSGD's state (now, or when the hook is built)."""
        self._saved = state or None
        if self.state is not None and state:
            self._restore(state)

    def _restore(self, saved: dict[str, Any]) -> None:
        """Set every saved slot (tensors were loaded onto this worker's device by the caller)."""
        for slot, value in saved.get("powersgd", {}).items():
            setattr(self.state, slot, value)
        self.residuals = dict(saved.get("residuals", {}))


# PowerSGDState's slots that are not saved: the process group, and memories kept per bucket index.
_PER_INDEX = ("process_group", "error_dict", "p_memory_dict", "q_memory_dict")
