"""``h2o`` (Heavy-Hitter Oracle): per layer and KV head, keep the tokens with the largest
accumulated attention plus a recent window; evicted entries are dropped from the store and
their blocks returned.

Definition used here (and in the test that checks it): after every step, a sequence that has
seen ``n`` tokens keeps ``total = min(n, floor((heavy_ratio + recent_ratio) * n))`` entries (at
least 1) per layer and KV head: the ``recent = min(total, max(1, floor(recent_ratio * n)))``
most recent positions, and the ``total - recent`` others with the largest accumulated
attention. A token's accumulated attention is the sum, over every query that attended to it
while it was cached and over the query heads sharing its KV head, of the softmax probability.
``kv_budget`` alone splits evenly into heavy and recent.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from backends.kvcache.policies.base import BatchMeta, CachePolicy
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs


class H2OKnobs(PolicyKnobs):
    kv_budget: float | None = Field(default=None, gt=0, le=1)  # None: 0.2 unless the ratios are given
    heavy_ratio: float | None = Field(default=None, ge=0, le=1)
    recent_ratio: float | None = Field(default=None, ge=0, le=1)


@POLICIES.register
class H2OPolicy(CachePolicy):
    name = "h2o"
    wants_probs = True
    lossy = True
    params_model = H2OKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        heavy, recent, budget = self.params["heavy_ratio"], self.params["recent_ratio"], self.params["kv_budget"]
        if heavy is None and recent is None:
            budget = 0.2 if budget is None else float(budget)
            heavy = recent = budget / 2
        self.heavy = float(heavy if heavy is not None else 0.0)
        self.recent = float(recent if recent is not None else 0.0)

    def bind(self, store):
        super().bind(store)
        store.add_field("score", (self.cfg.num_kv_heads,), torch.float32)
        store.add_field("pos", (self.cfg.num_kv_heads,), torch.int64)

    def budgets(self, n_seen: int) -> tuple[int, int]:
        """(total kept, recent kept) for a sequence that has seen ``n_seen`` tokens."""
        total = max(1, min(n_seen, math.floor((self.heavy + self.recent) * n_seen + 1e-9)))
        recent = min(total, max(1, math.floor(self.recent * n_seen + 1e-9)))
        return total, recent

    def kept_tokens(self, n_seen: int) -> int:
        return self.budgets(n_seen)[0]

    def on_write(self, layer, batch: BatchMeta, k_raw):
        pos = batch.positions.flatten().to(self.store.device)
        slots = batch.write_slots
        self.store.fields["pos"][layer][slots] = pos.unsqueeze(-1)
        self.store.fields["score"][layer].index_fill_(0, slots, 0.0)

    def observe(self, layer, probs, batch):
        per_kv = probs.float().sum(dim=2)  # [B,KVH,T,L]: summed over the query heads of a group
        if batch.is_prefill:  # column sums over the prompt's own queries (one sequence)
            cols = per_kv.sum(dim=2).transpose(1, 2).flatten(0, 1)  # [N,KVH]
            self.store.fields["score"][layer].index_copy_(0, batch.write_slots, cols)
        else:
            vals = per_kv[:, :, 0].transpose(1, 2)  # [B,L,KVH]; padded columns are exactly 0
            self.store.fields["score"][layer].index_put_((batch.slot_idx,), vals, accumulate=True)

    def observe_paged(self, layer, q, lse, batch):
        from backends.kvcache.kernels import ops

        ops().add_column_scores(q, self.store.k[layer], batch.block_table, batch.seq_lens, lse,
                                self.store.fields["score"][layer], self.scale, batch.block_size)

    def drop_rule(self):
        return True, 0

    def first_protected(self, n_seen):
        return n_seen - self.budgets(n_seen)[1]

    def eviction_key(self, seqs, slots):
        # the recent window is never evicted; the others go by accumulated attention
        first_recent = torch.tensor([self.first_protected(s.num_seen) for s in seqs], device=slots.device)
        score = self.store.fields["score"][:, slots]  # [L, B, W, KVH]
        pos = self.store.fields["pos"][:, slots]
        return torch.where(pos >= first_recent.view(1, -1, 1, 1), torch.inf, score)

    def select_keep(self, seq, slots):
        total = self.budgets(seq.num_seen)[0]
        if seq.num_stored <= total:
            return None
        key = self.eviction_key([seq], slots.unsqueeze(0))[:, 0]  # [L, stored, KVH]
        return key.topk(total, dim=1).indices.sort(dim=1).values
