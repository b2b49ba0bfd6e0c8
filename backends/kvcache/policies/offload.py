"""``offload``: the whole K/V in host memory, fetched in full for every layer of every decode
step (FlexGen-style baseline)."""

from __future__ import annotations

from backends.kvcache.policies.base import CachePolicy
from backends.kvcache.policies.registry import POLICIES


@POLICIES.register
class OffloadPolicy(CachePolicy):
    name = "offload"
    kv_on_host = True

    def context(self, layer, k_new, v_new, batch):
        return self.fetch_all(layer, k_new, v_new, batch)
