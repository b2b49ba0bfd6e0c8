"""Turns a scheduled step into one model forward: builds the per-step tensors, runs the model
with the cache policy as its attention, and picks the next token of every sequence.

Decoding sequences and newly admitted prompts share the forward (their tokens are flattened
to [1, N]), so admitting a request costs its prompt's compute, not a separate pass over the
weights."""

from __future__ import annotations

import torch

from backends.kvcache.kv_store import PagedKVStore
from backends.kvcache.policies.base import BatchMeta, CachePolicy, StepBatch
from backends.kvcache.sequence import Sequence


class ModelRunner:
    """One forward per step for all scheduled sequences."""

    def __init__(self, model: torch.nn.Module, policy: CachePolicy, store: PagedKVStore, device: torch.device):
        self.model, self.policy, self.store, self.device = model, policy, store, device
        self.step: StepBatch | None = None
        self.last_activation_bytes = 0

    def attend(self, layer, q, k, v, x, k_raw):
        """AttentionContext for the model: delegate to the cache policy."""
        return self.policy.attend(layer, q, k, v, x, k_raw, self.step)

    def _prefill_meta(self, seqs: list[Sequence]) -> tuple[BatchMeta, int]:
        dev = self.device
        lens = [s.num_tokens for s in seqs]
        t = max(lens)
        lens_t = torch.as_tensor(lens)
        ar = torch.arange(t)
        valid = ar.unsqueeze(0) < lens_t.unsqueeze(1)  # [B,T]
        causal = ar.view(1, t, 1) >= ar.view(1, 1, t)  # [1,T(q),T(k)]
        mask = causal & valid.unsqueeze(1)
        slots = self.store.slots([s.block_table for s in seqs], lens, t)
        rows = valid.flatten().nonzero().squeeze(1)
        meta = BatchMeta(
            is_prefill=True,
            seqs=seqs,
            positions=ar.expand(len(seqs), t).to(dev),
            write_slots=slots.flatten()[rows.to(slots.device)],
            write_rows=rows.to(dev),
            prefill_mask=mask[:, None, None].to(dev),
        )
        return meta, t

    def _decode_meta(self, seqs: list[Sequence]) -> BatchMeta:
        dev = self.device
        b = len(seqs)
        before = tuple(s.num_stored for s in seqs)
        prev = torch.as_tensor(before)
        slot_idx = self.store.slots([s.block_table for s in seqs], [n + 1 for n in before])
        width = slot_idx.shape[1]
        kv_valid = torch.arange(width).unsqueeze(0) <= prev.unsqueeze(1)
        return BatchMeta(
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

    @torch.inference_mode()
    def run(self, decode: list[Sequence], prefill: list[Sequence]) -> tuple[list[int], list[float | None]]:
        """Forward one step; return the next token of each sequence (decode ones first, then
        prefill ones), greedy or teacher-forced, and the forced tokens' log-probabilities."""
        seqs = decode + prefill
        for s in seqs:
            self.store.ensure_blocks(s.block_table)
        ids = [s.last_token_id for s in decode]
        positions = [s.num_seen for s in decode]
        last_rows = list(range(len(decode)))
        for s in prefill:
            ids.extend(s.all_token_ids)
            positions.extend(range(s.num_tokens))
            last_rows.append(len(ids) - 1)
        pre_meta, t = self._prefill_meta(prefill) if prefill else (None, 0)
        self.step = StepBatch(
            decode=self._decode_meta(decode) if decode else None,
            prefill=pre_meta,
            num_decode=len(decode),
            prefill_shape=(len(prefill), t),
        )
        self.policy.begin_step(self.step)
        dev = self.device
        hidden = self.model(torch.as_tensor([ids], device=dev), torch.as_tensor([positions], device=dev), self)
        logits = self.model.logits(hidden[0, torch.as_tensor(last_rows, device=dev)])
        self.step = None
        cfg = self.model.cfg
        self.last_activation_bytes = (
            len(ids) * (3 * cfg.hidden_size + 2 * cfg.intermediate_size) * cfg.dtype_bytes + logits.numel() * 4
        )
        if logits.device.type == "meta":  # dry run: shapes only
            return [0] * len(seqs), [None] * len(seqs)
        greedy = logits.argmax(dim=-1).tolist()
        forced_rows = [b for b, s in enumerate(seqs) if s.forced_token_ids is not None]
        logp = torch.log_softmax(logits[forced_rows], dim=-1) if forced_rows else None
        tokens, logprobs = [], []
        for b, s in enumerate(seqs):
            if s.forced_token_ids is None:
                tokens.append(greedy[b])
                logprobs.append(None)
                continue
            tok = s.forced_token_ids[len(s.output_token_ids)]
            tokens.append(tok)
            logprobs.append(float(logp[forced_rows.index(b), tok]))
        return tokens, logprobs
