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

from backends.compression.base import CompressContext, Compressor, Payload, register


@register
class A2SGDCompressor(Compressor):
    """Two fp32 scalars per worker per step; the update is rebuilt from the local sign pattern."""

    name = "a2sgd"
    collective = "allreduce"
    default_error_feedback = True
    default_mode = "flat"

    def __init__(self, config, rank: int = 0) -> None:
        super().__init__(config, rank)
        if config.residual not in ("global", "local"):
            raise ValueError(f"a2sgd residual must be 'global' or 'local', got {config.residual!r}")
        if config.threshold not in ("zero", "mean"):
            raise ValueError(f"a2sgd threshold must be 'zero' or 'mean', got {config.threshold!r}")
        self.residual_reference = config.residual

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """[m+, m-]: the means of v above and below the threshold; the mask stays local."""
        flat = tensor.reshape(-1).float()
        threshold = flat.mean() if self.config.threshold == "mean" else flat.new_zeros(())
        positive = flat >= threshold
        count_pos = positive.sum()
        count_neg = flat.numel() - count_pos
        sum_pos = torch.where(positive, flat, flat.new_zeros(())).sum()
        sum_neg = flat.sum() - sum_pos
        means = torch.stack([sum_pos / count_pos.clamp(min=1), sum_neg / count_neg.clamp(min=1)])
        ctx.extra["positive"] = positive
        return [means]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """u[j] = first (averaged) scalar where the local mask is set, else the second."""
        means = payload[0] / ctx.world_size
        u = torch.where(ctx.extra["positive"], means[0], means[1])
        return u.to(ctx.dtype).view(ctx.shape)
