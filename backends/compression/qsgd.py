"""QSGD: stochastic quantisation to s levels per bucket of elements (Alistarh et al., 2017).

For a bucket x with norm ||x||_2, element i becomes ||x|| * sign(x_i) * l_i / s, where
l_i = floor(s |x_i| / ||x||) + Bernoulli(frac(s |x_i| / ||x||)). E[Q(x)] = x, and
E||Q(x) - x||^2 <= min(d / s^2, sqrt(d) / s) ||x||^2 for a bucket of d elements.
Payload: the signed levels (int8 when s <= 127, else int16) and one fp32 norm per bucket.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.compression.base import COMPRESSORS, CompressContext, CompressionConfig, Compressor, Payload


def level_dtype(levels: int) -> torch.dtype:
    """Smallest signed integer type holding -s..s."""
    if levels <= 127:
        return torch.int8
    if levels <= 32767:
        return torch.int16
    raise ValueError(f"qsgd levels must be <= 32767, got {levels}")


@COMPRESSORS.register
class QSGDCompressor(Compressor):
    """Unbiased stochastic quantisation; all-gathered; error feedback optional (off by default)."""

    name = "qsgd"
    collective = "allgather"

    def __init__(self, config: CompressionConfig, rank: int = 0, seed: int = 0) -> None:
        super().__init__(config, rank, seed)
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        """Per-rank random stream for the rounding (seeded, checkpointed)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed * 1000003 + self.rank)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state.cpu())
        return self.generator

    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """Signed levels per element and one norm per bucket.

        The same arithmetic as written in the module's docstring, with each step after the first
        full-size temporary in place: on a CPU a temporary the size of the gradient costs about
        as much as the arithmetic on it.
        """
        s, d = self.config.levels, self.config.bucket_size
        flat = tensor.reshape(-1).float()
        pad = (-flat.numel()) % d
        buckets = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, d)
        norms = buckets.norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        scaled = buckets.abs().div_(safe[:, None]).mul_(s)
        lower = scaled.floor()
        frac = scaled.sub_(lower)
        noise = torch.rand(frac.shape, generator=self._rng(flat.device), device=flat.device)
        levels = torch.lt(noise, frac, out=frac).add_(lower)  # lower + Bernoulli(frac)
        signed = torch.copysign(levels, buckets, out=levels).to(level_dtype(s))
        return [signed.view(-1), norms]

    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """norm * level / s, trimmed to the original length."""
        signed, norms = payload
        d = self.config.bucket_size
        values = signed.view(-1, d).float().mul_((norms / self.config.levels)[:, None])
        n = ctx.shape.numel()
        return values.view(-1)[:n].to(ctx.dtype).view(ctx.shape)

    def state_dict(self) -> dict[str, Any]:
        """The rounding RNG state (a CPU byte tensor, for CPU and CUDA generators alike)."""
        if self.generator is not None:
            return {"generator": self.generator.get_state()}
        return {} if self._generator_state is None else {"generator": self._generator_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the rounding RNG stream."""
        self._generator_state = state.get("generator")
        self.generator = None
