"""Cache policies by name (the grid's ``backend`` values for our engine).

Each module of this package defines one policy and registers it with ``@POLICIES.register``;
importing the package imports them all (no hand-kept list).
"""

from __future__ import annotations

from backends.kvcache.policies.base import BatchMeta, CachePolicy, StepBatch
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs
from backends.registry import import_submodules

import_submodules(__name__)


def make_policy(name: str, params, model, cfg, device) -> CachePolicy:
    """Instantiate the policy called ``name``."""
    return POLICIES.get_or_raise(name)(dict(params or {}), model, cfg, device)


__all__ = ["POLICIES", "BatchMeta", "CachePolicy", "PolicyKnobs", "StepBatch", "make_policy"]
