"""``streaming`` (StreamingLLM): keep the first ``sink_tokens`` entries plus a recent window.

The window is ``window`` tokens, or, when ``window`` is not given, the budget (``kv_budget`` x
tokens seen, or ``kv_budget_tokens``) minus the sinks; with ``min_tokens`` nothing is evicted
until a sequence has seen that many tokens, and sinks + window never fall below it. Each
entry's position is tracked, so the oldest non-sink entry can be dropped in place.

Positions (RoPE models). StreamingLLM gives the cached entries their places *in the cache*:
sinks 0..s-1, the window s..n-1, the new token n (its keys are stored before RoPE and rotated
at those places for every step). A score under RoPE depends only on the distance between query
and key, and the window is always the latest tokens, so window distances are the same under
either numbering; only the sinks differ: in the cache they sit ``gap`` = (tokens evicted) closer
to the query. With ``rerotate`` (the default, as the paper) the sinks' keys are rotated again
at (position + gap) from their un-rotated copy at the start of every step where the gap has
grown, a few rows per sequence, so the decode path itself (paged kernel, CUDA graphs, the
in-place drop) is unchanged and attends exactly as to a fresh sequence of the kept tokens.
``rerotate: false`` keeps every key at the position it was computed at. Models with learned
absolute positions (OPT) carry no position in their keys: the knob changes nothing there.
"""

from __future__ import annotations

import math
import weakref

import torch
from pydantic import Field

from backends.kvcache.policies.base import CachePolicy, StepBatch
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs


class StreamingKnobs(PolicyKnobs):
    sink_tokens: int = Field(default=4, ge=0)
    window: int | None = Field(default=None, ge=1)  # None: kv_budget x tokens seen - sinks
    rerotate: bool = True  # positions inside the cache (StreamingLLM); false: the original positions


@POLICIES.register
class StreamingPolicy(CachePolicy):
    name = "streaming"
    lossy = True
    params_model = StreamingKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        self.sinks = int(self.params["sink_tokens"])
        self.rerotate = bool(self.params["rerotate"]) and cfg.arch == "llama" and self.sinks > 0
        if self.rerotate:
            from backends.kvcache.models.llama import rope_inv_freq

            self.inv_freq = rope_inv_freq(cfg).to(device)
        # per sequence: its sinks' keys before RoPE [layers, sinks, KVH, D], and the gap they are rotated for
        self.raw_sinks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.sink_gap: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _sizes(self, n_seen: int) -> tuple[int, int]:
        sink = self.sinks
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
        self.store.fields["pos"][layer][batch.write_slots] = batch.positions.flatten().unsqueeze(-1)
        if self.rerotate:
            self._keep_raw_sinks(layer, batch, k_raw)

    def _keep_raw_sinks(self, layer: int, batch, k_raw: torch.Tensor) -> None:
        """Copy the un-rotated keys of entries at positions below ``sink_tokens`` (host-side
        positions: a prefill starts at 0, a decode token sits at ``num_seen``)."""
        t = k_raw.shape[1]
        for b, seq in enumerate(batch.seqs):
            first = 0 if batch.is_prefill else seq.num_seen
            if first >= self.sinks:
                continue
            if first == 0 and layer == 0 or seq not in self.raw_sinks:  # a new (or recomputed) request
                self.raw_sinks[seq] = torch.zeros(self.cfg.num_layers, self.sinks, *k_raw.shape[2:],
                                                  dtype=k_raw.dtype, device=k_raw.device)
                self.sink_gap[seq] = 0
            n = min(self.sinks - first, t)
            self.raw_sinks[seq][layer, first : first + n] = k_raw[b, :n]

    def begin_step(self, step: StepBatch) -> None:
        super().begin_step(step)
        if self.rerotate and step.decode is not None and step.decode.seqs:
            self._rotate_sinks(step.decode.seqs)

    def _rotate_sinks(self, seqs) -> None:
        """Rotate the sinks of sequences whose gap (tokens evicted) grew since their last step
        at (position + gap), from their un-rotated copy (no rounding piles up)."""
        moved = [(s, s.num_seen - s.num_stored) for s in seqs
                 if s in self.raw_sinks and s.num_seen - s.num_stored != self.sink_gap[s]]
        if not moved:
            return
        raw = torch.stack([self.raw_sinks[s] for s, _ in moved]).float()  # [B, L, sinks, KVH, D]
        gaps = torch.tensor([g for _, g in moved], device=raw.device)
        pos = torch.arange(self.sinks, device=raw.device) + gaps[:, None]  # [B, sinks]
        ang = pos.float().unsqueeze(-1) * self.inv_freq.to(raw.device)  # [B, sinks, D/2]
        emb = torch.cat([ang, ang], -1)[:, None, :, None, :]  # [B, 1, sinks, 1, D]
        half = raw.shape[-1] // 2
        rotated = raw * emb.cos() + torch.cat([-raw[..., half:], raw[..., :half]], -1) * emb.sin()
        slots = self.store.slots([s.block_table for s, _ in moved], [self.sinks] * len(moved))  # [B, sinks]
        self.store.k[:, slots] = rotated.transpose(0, 1).to(self.store.dtype)
        for s, g in moved:
            self.sink_gap[s] = g

    def drop_rule(self):
        return False, self.sinks

    def eviction_key(self, seqs, slots):
        # sinks are never evicted; the others oldest first
        pos = self.store.fields["pos"][:, slots]  # [L, B, W, KVH]
        return torch.where(pos < self.sinks, torch.inf, pos.double())

    def select_keep(self, seq, slots):
        sink, window = self._sizes(seq.num_seen)
        if seq.num_stored <= sink + window:
            return None
        key = self.eviction_key([seq], slots.unsqueeze(0))[:, 0]  # [L, stored, KVH]
        return key.topk(min(seq.num_stored, sink + window), dim=1).indices.sort(dim=1).values
