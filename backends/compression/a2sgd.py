"""A2SGD: two local averages, two global averages, local error kept (see DESIGN.md).

    v = g + e
    P = {j : v[j] >= t}, N = complement        t = 0 ("zero") or mean(v) ("mean")
    m+ = mean(v[P]), m- = mean(v[N])           payload: [m+, m-], 8 bytes
    [M+, M-] = allreduce([m+, m-]) / p
    u[j] = M+ if j in P else M-
    e = v - u   (residual "global"; "local" keeps e = v - u_local built from m+, m-)
"""

from __future__ import annotations

import torch

from backends.compression.base import COMPRESSORS, CompressContext, CompressionConfig, Compressor, Payload


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of set elements of a flat bool tensor, as an fp32 scalar tensor.

    Summing bools is slow on GPUs; instead read 8 mask bytes as one int64 w = sum_i b_i 256^i.
    Since 256 = 1 (mod 255), w mod 255 = sum_i b_i (at most 8), so the count is the sum of
    w mod 255 over n / 8 words, plus the tail.
    """
    whole = mask.numel() // 8 * 8
    if whole == 0 or mask.storage_offset() % 8:
        return mask.sum(dtype=torch.float32)
    count = torch.remainder(mask[:whole].view(torch.int64), 255).sum()
    if whole < mask.numel():
        count = count + mask[whole:].sum()
    return count.float()


@COMPRESSORS.register
class A2SGDCompressor(Compressor):
    """Two fp32 scalars per worker per step; the update is rebuilt from the local sign pattern."""

    name = "a2sgd"
    collective = "allreduce"
    default_error_feedback = True
    default_mode = "flat"

    def __init__(self, config: CompressionConfig, rank: int = 0, seed: int = 0) -> None:
        super().__init__(config, rank, seed)
        self.residual_reference = config.residual

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """[m+, m-]: the means of v above and below the threshold; the mask stays local.

        Memory traffic is kept to a few reads: sum(v), sum|v - t| (no temporary: the
        threshold is broadcast), the mask, and its count. Above t, sum(v - t) equals
        (sum(v - t) + sum|v - t|) / 2, and below it (sum(v - t) - sum|v - t|) / 2.
        """
        flat = tensor.reshape(-1)
        n = flat.numel()
        total = flat.sum(dtype=torch.float32)
        if self.config.threshold == "mean":
            threshold = total / n
            positive = flat >= threshold
            shifted_l1 = torch.dist(flat.float(), threshold.expand_as(flat), p=1)
            shifted_sum = total - threshold * n
        else:  # few small ops: on GPUs their launch cost rivals the memory passes at 20M elements
            threshold = None
            positive = flat >= 0
            shifted_l1 = torch.linalg.vector_norm(flat, 1, dtype=torch.float32)
            shifted_sum = total
        count_pos = count_true(positive)
        counts = torch.stack([count_pos, n - count_pos])
        sums = torch.stack([shifted_sum + shifted_l1, shifted_sum - shifted_l1]) / 2
        if threshold is not None:
            sums = sums + threshold * counts
        means = sums / counts.clamp(min=1)
        ctx.extra["positive"] = positive
        return [means]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """u[j] = first (averaged) scalar where the local mask is set, else the second."""
        means = payload[0] / ctx.world_size
        u = torch.where(ctx.extra["positive"], means[0], means[1])
        return u.to(ctx.dtype).view(ctx.shape)
