"""``streaming`` (StreamingLLM): keep the first ``sink_tokens`` entries plus a recent window.

The window is ``window`` tokens, or, when ``window`` is not given, the budget (``kv_budget`` x
tokens seen, or ``kv_budget_tokens``) minus the sinks; with ``min_tokens`` nothing is evicted
until a sequence has seen that many tokens, and sinks + window never fall below it. Each
entry's position is tracked, so the oldest non-sink entry can be dropped in place.

A prompt stores only its sinks and window (selected inside the prefill, so a burst of prompts
holds about the budget).

Positions (RoPE models). StreamingLLM gives the cached entries their places *in the cache*:
sinks 0..s-1, the window s..n-1, the new token n (its keys are stored before RoPE and rotated
at those places for every step). A score under RoPE depends only on the distance between query
and key, and the window is always the latest tokens, so window distances are the same under
either numbering; only the sinks differ: in the cache they sit ``gap`` = (tokens evicted) closer
to the query. With ``rerotate`` (the default, as the paper) the sinks' keys are rotated again
at (position + gap) from an un-rotated copy at the start of every step where the gap has
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

from backends.kvcache.kv_store import to_device_async
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
    evicts_at_prefill = True
    params_model = StreamingKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        self.sinks = int(self.params["sink_tokens"])
        self.rerotate = bool(self.params["rerotate"]) and cfg.arch == "llama" and self.sinks > 0
        # on a GPU the re-rotation is one Triton launch reading cos/sin rows of every position
        # (computed as ``_rope`` computes them); elsewhere the torch expression
        self.rotation_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.rerotate:
            from backends.kvcache.kernels import triton_usable
            from backends.kvcache.models.llama import rope_inv_freq

            self.inv_freq = rope_inv_freq(cfg).to(device)
            if device.type == "cuda" and triton_usable(device):
                pos = torch.arange(cfg.max_position_embeddings, device=device)
                emb = self._angles(pos)
                self.rotation_tables = (emb.cos().contiguous(), emb.sin().contiguous())
        # per sequence: its sinks' keys before RoPE [layers, sinks, KVH, D] (float32), and the gap
        # (tokens evicted between sinks and window) they are rotated for
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
        if layer:  # a new entry's position is the same in every layer: one write for all of them
            return
        self.store.fields["pos"][:, batch.write_slots] = batch.positions.flatten().view(1, -1, 1)

    def begin_step(self, step: StepBatch) -> None:
        super().begin_step(step)
        if not self.rerotate:
            return
        for meta in step.prefill:  # a new (or recomputed) request: its sinks are stored afresh
            for seq in meta.seqs:
                self.raw_sinks.pop(seq, None)
                self.sink_gap.pop(seq, None)
        if step.decode is not None and step.decode.seqs:
            self._rotate_sinks(step.decode.seqs)

    def _angles(self, pos: torch.Tensor) -> torch.Tensor:
        """RoPE angles [..., D] at positions ``pos`` [...]."""
        ang = pos.float().unsqueeze(-1) * self.inv_freq.to(pos.device)
        return torch.cat([ang, ang], -1)

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE on t [L, B, sinks, KVH, D] (float32) at positions pos [B, sinks]."""
        emb = self._angles(pos)[None, :, :, None, :]  # [1, B, sinks, 1, D]
        half = t.shape[-1] // 2
        return t * emb.cos() + torch.cat([-t[..., half:], t[..., :half]], -1) * emb.sin()

    def _rotate_sinks(self, seqs) -> None:
        """Rotate the sinks of sequences whose gap (tokens evicted) changed since their last
        step at (position + gap), from an un-rotated copy (no rounding piles up). The copy is
        taken from the store the first time (the sinks are still at their own positions then),
        so nothing runs per layer or inside a captured decode graph."""
        moved = [(s, s.num_seen - s.num_stored) for s in seqs if s.num_seen - s.num_stored != self.sink_gap.get(s, 0)]
        if not moved:
            return
        slots = self.store.slots([s.block_table for s, _ in moved], [self.sinks] * len(moved))  # [B, sinks]
        own = torch.arange(self.sinks, device=slots.device)
        fresh = [b for b, (s, _) in enumerate(moved) if s not in self.raw_sinks]
        if fresh:
            rows = slots[fresh]
            raw = self._rope(self.store.k[:, rows].float(), -own.expand(len(fresh), -1))  # [L, b, sinks, KVH, D]
            for i, b in enumerate(fresh):
                self.raw_sinks[moved[b][0]] = raw[:, i]
        raw = torch.stack([self.raw_sinks[s] for s, _ in moved], dim=1)  # [L, B, sinks, KVH, D]
        gaps = to_device_async(torch.tensor([g for _, g in moved]), slots.device)
        if self.rotation_tables is not None:
            from backends.kvcache.kernels import ops

            ops().rerotate_rows(self.store.k, raw, slots, gaps, *self.rotation_tables)
        else:
            self.store.k[:, slots] = self._rope(raw, own + gaps[:, None]).to(self.store.dtype)
        for s, g in moved:
            self.sink_gap[s] = g

    def drop_rule(self):
        return False, self.sinks

    def eviction_key(self, seqs, slots):
        # sinks are never evicted; the others oldest first
        pos = self.store.fields["pos"][:, slots]  # [L, B, W, KVH]
        return torch.where(pos < self.sinks, torch.inf, pos.double())

    def prefill_keep(self, layer, probs, batch):
        n = batch.positions.shape[1]
        kept, window = self.prefill_stored(n), self._sizes(n)[1]
        sinks = kept - min(window, kept)  # (fewer than the sinks when the floor keeps everything)
        pos = torch.cat([torch.arange(sinks), torch.arange(n - (kept - sinks), n)]).to(batch.positions.device)
        self.store.fields["pos"][layer, batch.write_slots] = pos.unsqueeze(1).to(self.store.device)
        return pos.unsqueeze(1).expand(-1, self.cfg.num_kv_heads)

    def select_keep(self, seq, slots):
        sink, window = self._sizes(seq.num_seen)
        if seq.num_stored <= sink + window:
            return None
        key = self.eviction_key([seq], slots.unsqueeze(0))[:, 0]  # [L, stored, KVH]
        return key.topk(min(seq.num_stored, sink + window), dim=1).indices.sort(dim=1).values
