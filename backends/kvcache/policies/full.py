"""``full``: every token's K/V stays on the device (the vLLM-style baseline inside our engine)."""

from __future__ import annotations

from backends.kvcache.policies.base import CachePolicy
from backends.kvcache.policies.registry import POLICIES


@POLICIES.register
class FullPolicy(CachePolicy):
    name = "full"
