"""Half-precision all-reduce: halves the bytes, keeps every element.

In hook mode it is PyTorch's own ``fp16_compress_hook`` (cast, asynchronous all-reduce,
decompress in a callback); in flat mode the same cast around one all-reduce.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from backends.compression.base import COMPRESSORS, CompressContext, Compressor, Payload
from backends.compression.communicator import Communicator
from backends.compression.layout import ParameterPositions


@COMPRESSORS.register
class FP16Compressor(Compressor):
    """Casts to fp16 before the all-reduce and back after (2n bytes payload)."""

    name = "fp16"
    collective = "allreduce"
    native_hook = True

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """The tensor in half precision (the sum of p such payloads is taken in fp16)."""
        return [tensor.to(torch.float16)]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Back to the original dtype, averaged over the workers summed in the payload."""
        return payload[0].to(ctx.dtype) / ctx.world_size

    def make_ddp_hook(self, communicator: Communicator, parameters: ParameterPositions):
        """PyTorch's fp16 compression hook, counting the bucket's bytes in fp16."""

        def hook(group, bucket) -> torch.futures.Future[torch.Tensor]:
            communicator.count_external_allreduce(bucket.buffer().numel() * 2)
            return default_hooks.fp16_compress_hook(group, bucket)

        return communicator.group, hook
