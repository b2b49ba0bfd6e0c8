"""``full``: every token's K/V stays on the device (the vLLM-style baseline inside our engine)."""

from __future__ import annotations

from backends.kvcache.policies.base import CachePolicy


class FullPolicy(CachePolicy):
    name = "full"
