"""Half-precision all-reduce: halves the bytes, keeps every element."""

from __future__ import annotations

import torch

from backends.compression.base import COMPRESSORS, CompressContext, Compressor, Payload


@COMPRESSORS.register
class FP16Compressor(Compressor):
    """Casts to fp16 before the all-reduce and back after (2n bytes payload)."""

    name = "fp16"
    collective = "allreduce"

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """The tensor in half precision (the sum of p such payloads is taken in fp16)."""
        return [tensor.to(torch.float16)]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Back to the original dtype, averaged over the workers summed in the payload."""
        return payload[0].to(ctx.dtype) / ctx.world_size
