"""Cache policies by name (the grid's ``backend`` values for our engine)."""

from __future__ import annotations

from backends.kvcache.policies.base import BatchMeta, CachePolicy, StepBatch
from backends.kvcache.policies.full import FullPolicy
from backends.kvcache.policies.h2o import H2OPolicy
from backends.kvcache.policies.infinigen import InfiniGenPolicy
from backends.kvcache.policies.offload import OffloadPolicy
from backends.kvcache.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p for p in (FullPolicy, H2OPolicy, InfiniGenPolicy, OffloadPolicy, StreamingPolicy)
}


def make_policy(name: str, params, model, cfg, device) -> CachePolicy:
    """Instantiate the policy called ``name``."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](dict(params or {}), model, cfg, device)


__all__ = ["POLICIES", "BatchMeta", "CachePolicy", "StepBatch", "make_policy"]
