"""Error feedback across DDP's bucket layouts.

DDP runs its first step with every parameter in one bucket, then rebuilds its buckets in the
order the gradients became ready, and does the same again in every restarted run. A residual
kept per bucket must follow its parameters from one layout to the next: kept under the old
layout's key, a resumed run's first step added a stale residual (the one of the run's first
step) and the residual of the step before the checkpoint was never used again. Residuals are
keyed by the positions, in the model, of their bucket's parameters in bucket order
(``params:6,5,1``), so a key says which slice of its tensor belongs to which parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bucket_key(positions: Sequence[int]) -> str:
    """The residual key of a bucket holding the parameters at ``positions``, in bucket order."""
    return "params:" + ",".join(str(p) for p in positions)


def key_positions(key: str) -> list[int]:
    """The parameter positions a residual key names (inverse of ``bucket_key``)."""
    return [int(p) for p in key.removeprefix("params:").split(",") if p]


def carry_residual(residuals: dict[str, torch.Tensor], positions: Sequence[int], sizes: Sequence[int]) -> str:
    """The key of the bucket of ``positions``; first, when it has no residual yet, assemble one
    from the residuals holding its parameters (the newest for each; zeros for a parameter none
    holds), and drop every residual whose parameters newer ones all hold.

    ``sizes[i]`` is the number of elements of the parameter at position ``i``. Dict order is age:
    a key is added once and keeps its place when its tensor is replaced.
    """
    key = bucket_key(positions)
    if key in residuals or not residuals:
        return key
    held: dict[int, torch.Tensor] = {}
    for other, flat in residuals.items():  # oldest first, so the newest holder wins
        offset = 0
        for position in key_positions(other):
            held[position] = flat[offset : offset + sizes[position]]
            offset += sizes[position]
    like = next(iter(residuals.values()))
    residuals[key] = torch.cat([
        held[p] if p in held else like.new_zeros(sizes[p]) for p in positions
    ])
    keys = list(residuals)
    for age, other in enumerate(keys):
        newer = {p for k in keys[age + 1 :] for p in key_positions(k)}
        if set(key_positions(other)) <= newer:
            del residuals[other]
    return key


class ParameterPositions:
    """Each parameter of a model by its position in ``model.parameters()``, and its size."""

    def __init__(self, model: torch.nn.Module) -> None:
        parameters = list(model.parameters())
        self._position = {p: i for i, p in enumerate(parameters)}
        self.sizes = [p.numel() for p in parameters]

    def of(self, bucket: torch.distributed.GradBucket) -> list[int]:
        """The positions of a DDP bucket's parameters, in bucket order."""
        return [self._position[p] for p in bucket.parameters()]
