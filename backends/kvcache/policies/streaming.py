"""``streaming`` (StreamingLLM): keep the first ``sink_tokens`` entries plus a recent window.

The window is ``window`` tokens, or, when ``window`` is not given, ``kv_budget`` x tokens seen
minus the sinks. Cached keys keep the positions they were computed at (no re-rotation).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from backends.kvcache.policies.base import CachePolicy
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs


class StreamingKnobs(PolicyKnobs):
    sink_tokens: int = Field(default=4, ge=0)
    window: int | None = Field(default=None, ge=1)  # None: kv_budget x tokens seen - sinks


@POLICIES.register
class StreamingPolicy(CachePolicy):
    name = "streaming"
    lossy = True
    params_model = StreamingKnobs

    def _sizes(self, n_seen: int) -> tuple[int, int]:
        sink = int(self.params["sink_tokens"])
        window = self.params["window"]
        if window is None:
            window = max(1, math.floor(float(self.params["kv_budget"]) * n_seen) - sink)
        return sink, int(window)

    def kept_tokens(self, n_seen: int) -> int:
        sink, window = self._sizes(n_seen)
        return min(n_seen, sink + window)

    def select_keep(self, seq, slots):
        stored = seq.num_stored
        sink, window = self._sizes(seq.num_seen)
        if stored <= sink + window:
            return None
        # entries are in position order (this policy only ever drops a middle range)
        idx = torch.cat([torch.arange(sink), torch.arange(stored - window, stored)]).to(slots.device)
        return idx.view(1, -1, 1).expand(self.cfg.num_layers, -1, self.cfg.num_kv_heads)
