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

A prompt is selected inside its prefill, layer by layer, from the prompt's own attention (its
column sums), and only the kept entries reach the store: a burst of prompts holds about the
budget, plus one layer of the prompts while that layer selects.

Budgets as counts, as H2O's own serving code states them (a fixed heavy and recent size):
``heavy_tokens`` + ``recent_tokens`` entries per layer and KV head, or ``kv_budget_tokens``
split evenly (recent gets the odd one). ``min_tokens`` is a floor: while ``n <= min_tokens``
nothing is evicted, and ``total`` never drops below it. Fractions and counts do not mix.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from backends.kvcache.policies.base import BatchMeta, CachePolicy
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs


class H2OKnobs(PolicyKnobs):
    kv_budget: float | None = Field(default=None, gt=0, le=1)  # None: 0.2 unless the ratios are given
    heavy_ratio: float | None = Field(default=None, ge=0, le=1)
    recent_ratio: float | None = Field(default=None, ge=0, le=1)
    heavy_tokens: int | None = Field(default=None, ge=0)
    recent_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_form(self) -> H2OKnobs:
        given = {k for k in self.model_fields_set if getattr(self, k) is not None}
        fractions = sorted(given & {"kv_budget", "heavy_ratio", "recent_ratio"})
        counts = sorted(given & {"heavy_tokens", "recent_tokens"})
        if "kv_budget_tokens" in given and counts:
            raise ValueError(f"give kv_budget_tokens or {'/'.join(counts)}, not both")
        if "kv_budget" in given and len(fractions) > 1:
            raise ValueError(f"give kv_budget (split evenly into heavy and recent) or "
                             f"{'/'.join(f for f in fractions if f != 'kv_budget')}, not both")
        if fractions and (counts or "kv_budget_tokens" in given):
            raise ValueError(f"give the budget as fractions ({', '.join(fractions)}) or as token counts "
                             f"({', '.join(counts or ['kv_budget_tokens'])}), not both")
        return self


@POLICIES.register
class H2OPolicy(CachePolicy):
    name = "h2o"
    wants_probs = True
    evicts_at_prefill = True
    lossy = True
    params_model = H2OKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        p = self.params
        heavy, recent, budget = p["heavy_ratio"], p["recent_ratio"], p["kv_budget"]
        if heavy is None and recent is None:
            budget = 0.2 if budget is None else float(budget)
            heavy = recent = budget / 2
        self.heavy = float(heavy if heavy is not None else 0.0)
        self.recent = float(recent if recent is not None else 0.0)
        # counts (None: the fractions decide); kv_budget_tokens splits evenly, recent gets the odd one
        self.counts: tuple[int, int] | None = None
        if p["kv_budget_tokens"] is not None:
            total = int(p["kv_budget_tokens"])
            self.counts = (total // 2, total - total // 2)
        elif p["heavy_tokens"] is not None or p["recent_tokens"] is not None:
            self.counts = (int(p["heavy_tokens"] or 0), int(p["recent_tokens"] or 0))

    def bind(self, store):
        super().bind(store)
        store.add_field("score", (self.cfg.num_kv_heads,), torch.float32)
        store.add_field("pos", (self.cfg.num_kv_heads,), torch.int64)

    def budgets(self, n_seen: int) -> tuple[int, int]:
        """(total kept, recent kept) for a sequence that has seen ``n_seen`` tokens."""
        if self.counts is not None:
            total, recent = sum(self.counts), self.counts[1]
        else:
            total = math.floor((self.heavy + self.recent) * n_seen + 1e-9)
            recent = math.floor(self.recent * n_seen + 1e-9)
        # the floor applies through the base (min_tokens); kv_budget_tokens is already in counts
        total = max(1, min(n_seen, max(total, int(self.params["min_tokens"]))))
        return total, min(total, max(1, recent))

    def kept_tokens(self, n_seen: int) -> int:
        return self.budgets(n_seen)[0]

    def on_write(self, layer, batch: BatchMeta, k_raw):
        if layer:  # a new entry's position and zero score are the same in every layer: one write each
            return
        slots = batch.write_slots
        self.store.fields["pos"][:, slots] = batch.positions.flatten().to(self.store.device).view(1, -1, 1)
        self.store.fields["score"].index_fill_(1, slots, 0.0)

    def observe(self, layer, probs, batch):
        # decode (a prompt's column sums are taken in prefill_keep): summed over a group's query heads
        vals = probs.float().sum(dim=2)[:, :, 0].transpose(1, 2)  # [B,L,KVH]; padded columns are exactly 0
        self.store.fields["score"][layer].index_put_((batch.slot_idx,), vals, accumulate=True)

    def paged_decode(self, layer, q, batch):
        from backends.kvcache.kernels import ops

        # the kernel adds each key's probability to its score in the same pass (no second launch)
        out, _ = ops().paged_decode_attention(
            q, self.store.k[layer], self.store.v[layer], batch.block_table, batch.seq_lens, self.scale,
            batch.block_size, score=self.store.fields["score"][layer],
        )
        return out

    def drop_rule(self):
        return True, 0

    def first_protected(self, n_seen):
        return n_seen - self.budgets(n_seen)[1]

    @staticmethod
    def rank(score: torch.Tensor, pos: torch.Tensor, first_recent: torch.Tensor) -> torch.Tensor:
        """The recent window (positions from ``first_recent`` on) is never evicted; the others
        go by accumulated attention."""
        return torch.where(pos >= first_recent, torch.inf, score)

    def eviction_key(self, seqs, slots):
        first_recent = torch.tensor([self.first_protected(s.num_seen) for s in seqs], device=slots.device)
        score = self.store.fields["score"][:, slots]  # [L, B, W, KVH]
        return self.rank(score, self.store.fields["pos"][:, slots], first_recent.view(1, -1, 1, 1))

    def prefill_keep(self, layer, probs, batch):
        n = batch.positions.shape[1]
        score = probs[0].float().sum(dim=(1, 2)).transpose(0, 1)  # [T, KVH]: column sums over the prompt
        pos = batch.positions[0].to(score.device).unsqueeze(1).expand_as(score)
        key = self.rank(score, pos, torch.tensor(self.first_protected(n), device=score.device))
        keep = key.topk(self.prefill_stored(n), dim=0).indices.sort(dim=0).values  # [n_keep, KVH]
        slots = batch.write_slots
        self.store.fields["score"][layer, slots] = score.gather(0, keep).to(self.store.device)
        self.store.fields["pos"][layer, slots] = pos.gather(0, keep).to(self.store.device)
        return keep

    def select_keep(self, seq, slots):
        total = self.budgets(seq.num_seen)[0]
        if seq.num_stored <= total:
            return None
        key = self.eviction_key([seq], slots.unsqueeze(0))[:, 0]  # [L, stored, KVH]
        return key.topk(total, dim=1).indices.sort(dim=1).values
