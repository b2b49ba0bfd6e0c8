"""Dense all-reduce: the uncompressed baseline.

In hook mode it is DDP's own overlapped, bucketed all-reduce (PyTorch's ``allreduce_hook``, the
hook equivalent of DDP's built-in reduction), as DDP users run it; in flat mode one all-reduce
of the whole flattened gradient.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from backends.compression.base import COMPRESSORS, CompressContext, Compressor, Payload
from backends.compression.communicator import Communicator
from backends.compression.layout import ParameterPositions


@COMPRESSORS.register
class DenseCompressor(Compressor):
    """Sends the fp32 gradient as is (ring all-reduce of 4n bytes)."""

    name = "dense"
    collective = "allreduce"
    native_hook = True

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """The payload is the tensor itself (a copy, so the collective may write in place)."""
        return [tensor.clone()]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """The summed payload divided by the number of workers."""
        return payload[0] / ctx.world_size

    def make_ddp_hook(self, communicator: Communicator, parameters: ParameterPositions):
        """PyTorch's all-reduce hook (averages each bucket asynchronously), counting the bucket's bytes."""

        def hook(group, bucket) -> torch.futures.Future[torch.Tensor]:
            communicator.count_external_allreduce(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(group, bucket)

        return communicator.group, hook
