"""PowerSGD through PyTorch's own DDP hook (Vogels et al., 2019), with byte counting.

PowerSGD interleaves collectives with compression (all-reduce P, orthogonalise, compute Q,
all-reduce Q), so it does not fit the compress -> one collective -> decompress shape; it runs
as PyTorch's ``powerSGD_hook`` and its bytes are counted from PyTorch's own tally of the
elements it hands to all-reduce (``PowerSGDState.total_numel_after_compression``: the P and Q
matrices plus the tensors it sends uncompressed), or the whole bucket before ``start_iter``.
"""


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

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """Not available: PowerSGD needs collectives between its compression steps."""
        raise NotImplementedError("powersgd runs only as a DDP hook (mode: hook)")

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Not available (see compress)."""
        raise NotImplementedError("powersgd runs only as a DDP hook (mode: hook)")

    def make_ddp_hook(self, communicator: Communicator):
        """PyTorch's PowerSGD state and a hook around ``powerSGD_hook`` that counts each bucket's bytes."""
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
            buffer = bucket.buffer()
            compressing = state.iter >= state.start_powerSGD_iter
            before = state.total_numel_after_compression
            fut = powersgd.powerSGD_hook(state, bucket)
            numel = state.total_numel_after_compression - before if compressing else buffer.numel()
            communicator.count_external_allreduce(numel * buffer.element_size())
            return fut

        return self.state, hook

    def state_dict(self) -> dict[str, Any]:
        """PowerSGD's state (error feedback, warm-start Q, iteration, RNG) minus the process group."""
        if self.state is None:
            return self._saved or {}
        return {slot: getattr(self.state, slot) for slot in self.state.__slots__ if slot != "process_group"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore PowerSGD's state (now, or when the hook is built)."""
        self._saved = state or None
        if self.state is not None and state:
            self._restore(state)

    def _restore(self, saved: dict[str, Any]) -> None:
        """Set every saved slot (tensors were loaded onto this worker's device by the caller)."""
        for slot, value in saved.items():
            setattr(self.state, slot, value)
