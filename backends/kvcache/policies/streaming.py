"""``streaming`` (StreamingLLM): keep the first ``sink_tokens`` entries plus a recent window.

The window is ``window`` tokens, or, when ``window`` is not given, the budget (``kv_budget`` x
tokens seen, or ``kv_budget_tokens``) minus the sinks; with ``min_tokens`` nothing is evicted
until a sequence has seen that many tokens, and sinks + window never fall below it. Cached keys
keep the positions they were computed at (no re-rotation). Each
entry's position is tracked, so the oldest non-sink entry can be dropped in place.
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
            total = self.token_budget(n_seen, math.floor(float(self.params["kv_budget"]) * n_seen))
        else:
            total = max(sink + int(window), min(n_seen, int(self.params["min_tokens"])))
        return sink, max(1, total - sink)

    def kept_tokens(self, n_seen: int) -> int:
        sink, window = self._sizes(n_seen)
        return min(n_seen, sink + window)

    def bind(self, store):
        super().bind(store)
        store.add_field("pos", (self.cfg.num_kv_heads,), torch.int64)

    def on_write(self, layer, batch, k_raw):
        if layer:  # a new entry's position is the same in every layer: one write for all of them
            return
        self.store.fields["pos"][:, batch.write_slots] = batch.positions.flatten().view(1, -1, 1)

    def drop_rule(self):
        return False, int(self.params["sink_tokens"])

    def eviction_key(self, seqs, slots):
        # sinks are never evicted; the others oldest first
        pos = self.store.fields["pos"][:, slots]  # [L, B, W, KVH]
        return torch.where(pos < int(self.params["sink_tokens"]), torch.inf, pos.double())

    def select_keep(self, seq, slots):
        sink, window = self._sizes(seq.num_seen)
        if seq.num_stored <= sink + window:
            return None
        key = self.eviction_key([seq], slots.unsqueeze(0))[:, 0]  # [L, stored, KVH]
        return key.topk(min(seq.num_stored, sink + window), dim=1).indices.sort(dim=1).values
