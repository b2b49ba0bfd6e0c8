"""Turns a scheduled batch into one model forward: builds the per-step tensors, runs the model
with the cache policy as its attention, and picks the next token of every sequence."""

from __future__ import annotations

import torch

from backends.kvcache.kv_store import PagedKVStore
from backends.kvcache.policies.base import BatchMeta, CachePolicy
from backends.kvcache.sequence import Sequence


class ModelRunner:
    """One forward per step for all scheduled sequences (prefill batch or decode batch)."""

    def __init__(self, model: torch.nn.Module, policy: CachePolicy, store: PagedKVStore, device: torch.device):
        self.model, self.policy, self.store, self.device = model, policy, store, device
        self.batch: BatchMeta | None = None
        self.last_activation_bytes = 0

    def attend(self, layer, q, k, v, x, k_raw):
        """AttentionContext for the model: delegate to the cache policy."""
        return self.policy.attend(layer, q, k, v, x, k_raw, self.batch)

    def _prefill_batch(self, seqs: list[Sequence]) -> tuple[torch.Tensor, BatchMeta, torch.Tensor]:
        dev = self.device
        lens = [s.num_tokens for s in seqs]
        t = max(lens)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : lens[b]] = torch.as_tensor(s.all_token_ids)
        lens_t = torch.as_tensor(lens)
        ar = torch.arange(t)
        valid = ar.unsqueeze(0) < lens_t.unsqueeze(1)  # [B,T]
        causal = ar.view(1, t, 1) >= ar.view(1, 1, t)  # [1,T(q),T(k)]
        mask = causal & valid.unsqueeze(1)
        slots = self.store.slots([s.block_table for s in seqs], lens, t)
        rows = valid.flatten().nonzero().squeeze(1)
        batch = BatchMeta(
            is_prefill=True,
            seqs=seqs,
            positions=ar.expand(len(seqs), t).to(dev),
            write_slots=slots.flatten()[rows.to(slots.device)],
            write_rows=rows.to(dev),
            prefill_mask=mask[:, None, None].to(dev),
        )
        return ids.to(dev), batch, (lens_t - 1).to(dev)

    def _decode_batch(self, seqs: list[Sequence]) -> tuple[torch.Tensor, BatchMeta, torch.Tensor]:
        dev = self.device
        b = len(seqs)
        ids = torch.as_tensor([[s.last_token_id] for s in seqs])
        before = tuple(s.num_stored for s in seqs)
        prev = torch.as_tensor(before)
        slot_idx = self.store.slots([s.block_table for s in seqs], [n + 1 for n in before])
        width = slot_idx.shape[1]
        kv_valid = torch.arange(width).unsqueeze(0) <= prev.unsqueeze(1)
        batch = BatchMeta(
            is_prefill=False,
            seqs=seqs,
            positions=torch.as_tensor([[s.num_seen] for s in seqs]).to(dev),
            write_slots=slot_idx[torch.arange(b), prev.to(slot_idx.device)],
            write_rows=torch.arange(b, device=dev),
            slot_idx=slot_idx,
            kv_valid=kv_valid.to(dev),
            prev_len=prev.to(dev),
            stored_before=before,
        )
        return ids.to(dev), batch, torch.zeros(b, dtype=torch.long, device=dev)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float | None]]:
        """Forward the batch; return each sequence's next token (greedy or teacher-forced) and,
        for teacher-forced sequences, that token's log-probability."""
        for s in seqs:
            self.store.ensure_blocks(s.block_table)
        ids, self.batch, last = (self._prefill_batch if is_prefill else self._decode_batch)(seqs)
        self.policy.begin_step(self.batch)
        hidden = self.model(ids, self.batch.positions, self)
        logits = self.model.logits(hidden[torch.arange(len(seqs), device=self.device), last])
        self.batch = None
        cfg = self.model.cfg
        tokens_fed = ids.numel()
        self.last_activation_bytes = (
            tokens_fed * (3 * cfg.hidden_size + 2 * cfg.intermediate_size) * cfg.dtype_bytes
            + logits.numel() * 4
        )
        if logits.device.type == "meta":  # dry run: shapes only
            return [0] * len(seqs), [None] * len(seqs)
        greedy = logits.argmax(dim=-1).tolist()
        tokens, logprobs = [], []
        forced_rows = [b for b, s in enumerate(seqs) if s.forced_token_ids is not None]
        logp = torch.log_softmax(logits[forced_rows], dim=-1) if forced_rows else None
        for b, s in enumerate(seqs):
            if s.forced_token_ids is None:
                tokens.append(greedy[b])
                logprobs.append(None)
                continue
            tok = s.forced_token_ids[len(s.output_token_ids)]
            tokens.append(tok)
            logprobs.append(float(logp[forced_rows.index(b), tok]))
        return tokens, logprobs
