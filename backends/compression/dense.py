"""Dense all-reduce: the uncompressed baseline."""

from __future__ import annotations

import torch

from backends.compression.base import COMPRESSORS, CompressContext, Compressor, Payload


@COMPRESSORS.register
class DenseCompressor(Compressor):
    """Sends the fp32 gradient as is (ring all-reduce of 4n bytes)."""

    name = "dense"
    collective = "allreduce"

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """The payload is the tensor itself (a copy, so the collective may write in place)."""
        return [tensor.clone()]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """The summed payload divided by the number of workers."""
        return payload[0] / ctx.world_size
