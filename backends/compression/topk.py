"""Top-K sparsification: keep the k largest magnitudes, send values and indices."""

from __future__ import annotations

import math

import torch

from backends.compression.base import COMPRESSORS, CompressContext, Compressor, Payload


def topk_count(numel: int, ratio: float) -> int:
    """k = max(1, ceil(ratio * n)), capped at n."""
    return min(numel, max(1, math.ceil(ratio * numel)))


@COMPRESSORS.register
class TopKCompressor(Compressor):
    """Payload: k fp32 values and k int32 indices; all-gathered, with error feedback."""

    name = "topk"
    collective = "allgather"
    default_error_feedback = True

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """Exactly the k elements of largest |value| (ties broken by torch.topk)."""
        flat = tensor.reshape(-1)
        k = topk_count(flat.numel(), self.config.ratio)
        _, indices = torch.topk(flat.abs(), k, sorted=False)
        return [flat[indices], indices.to(torch.int32)]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Scatter the values into zeros of the original size."""
        values, indices = payload
        out = torch.zeros(ctx.shape.numel(), dtype=ctx.dtype, device=values.device)
        out.index_put_((indices.long(),), values.to(ctx.dtype), accumulate=True)
        return out.view(ctx.shape)
