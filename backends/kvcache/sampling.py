"""How a request's next token is chosen: greedy (temperature 0) or sampled with temperature and
nucleus (top-p) truncation from the request's own seeded generator.

Each request draws from its own ``torch.Generator``, so a request given a seed produces the same
tokens whatever it is batched with and however often it is preempted (recompute keeps the
generated tokens; the generator simply continues).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Temperature (0 = greedy), top-p in (0, 1], and an optional seed for reproducible sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        """Whether the argmax is taken (no randomness)."""
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: SamplingParams) -> int:
    """One token id drawn from ``logits`` [vocab] under ``params`` (on the CPU, in float32)."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.detach().float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=params.generator))
