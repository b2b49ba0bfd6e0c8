"""The cache-policy interface: what is kept, where it lives, and what is fetched for attention.

The model calls ``attend`` once per layer. The base class is the device-resident full cache
(vLLM-style baseline); policies override the hooks they change: ``kept_tokens``/``select_keep``
(eviction), ``context`` (what K/V reach the device for attention), ``observe`` (scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from backends.kvcache.config import ModelConfig
from backends.kvcache.kv_store import PagedKVStore
from backends.kvcache.policies.registry import PolicyKnobs
from backends.kvcache.sequence import Sequence


@dataclass
class BatchMeta:
    """Per-step tensors the model runner builds once and every layer reuses."""

    is_prefill: bool
    seqs: list[Sequence]
    positions: torch.Tensor  # [B, T]
    write_slots: torch.Tensor  # [B*T] store slots of the new tokens (prefill: of the entries it stores)
    # decode, reference path: the cached entries
    slot_idx: torch.Tensor | None = None  # decode: [B, L] slots of stored entries + the new one
    kv_valid: torch.Tensor | None = None  # decode: [B, L]
    prev_len: torch.Tensor | None = None  # decode: [B] entries stored before this step (= new token's column)
    stored_before: tuple[int, ...] = ()  # decode: prev_len as Python ints (accounting without a sync)
    # decode through the paged kernel (GPU): the kernel reads the block table, no gather, no mask
    block_table: torch.Tensor | None = None  # [B, W] int32 block ids
    seq_lens: torch.Tensor | None = None  # [B] int32 entries to attend to (stored + the new one)
    block_size: int = 0
    host_write_slots: torch.Tensor | None = None  # write_slots on the host (for a host-resident store)


@dataclass
class StepBatch:
    """One engine step: decoding sequences and newly admitted (prefill) sequences, run in a
    single forward over their tokens flattened to [1, N]: decode tokens first, then each
    prefill sequence's tokens in order. Attention runs on the decode part as a batch and on
    each prompt by itself (variable length, no padding: a prompt never sees its batch-mates)."""

    decode: BatchMeta | None
    prefill: list[BatchMeta]
    num_decode: int


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, want_probs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped-query attention. q [B,T,H,D]; k, v [B,KVH,L,D]; mask bool, broadcastable to
    [B,KVH,1,T,L], or None for causal attention over T == L. Returns out [B,T,H,D] and, if
    asked, probabilities [B,KVH,G,T,L]."""
    b, t, h, d = q.shape
    kvh, length = k.shape[1], k.shape[2]
    g = h // kvh
    if mask is None and not want_probs:  # causal: the fused kernel needs no mask tensor
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        return out.transpose(1, 2), None
    if mask is None:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril()
    # one query row on a GPU: two batched products below; SDPA would build a plan per masked shape
    if not want_probs and not (q.is_cuda and t == 1):  # fused kernel; the mask goes per query head
        m = mask.expand(b, kvh, 1, t, length)
        m = m[:, :1, 0] if mask.shape[1] == 1 else m.expand(b, kvh, g, t, length).reshape(b, h, t, length)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=m, scale=scale, enable_gqa=g > 1)
        return out.transpose(1, 2), None
    qg = q.view(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, kvh, g, t, length)
    scores = (scores.float() * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(b, kvh, g * t, length), v).view(b, kvh, g, t, d)
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, h, d), probs if want_probs else None


class CachePolicy:
    """Full cache on the device. Subclasses set ``name`` and override hooks; each registers with
    ``@POLICIES.register`` (backends/kvcache/policies/registry.py)."""

    name: ClassVar[str] = "full"
    kv_on_host: ClassVar[bool] = False  # where the K/V store lives
    wants_probs: ClassVar[bool] = False  # observe() needs attention probabilities
    # Drops cache entries: output quality differs from the full cache's and is measured by default.
    lossy: ClassVar[bool] = False
    # Selects what a prompt keeps inside its prefill, layer by layer (``prefill_keep``), so only
    # the kept entries ever reach the store: a burst of prompts needs about the budget, not the
    # prompts' full K/V until the step ends.
    evicts_at_prefill: ClassVar[bool] = False
    # The policy's knobs, typed, with their defaults (the grid's ``policy.*`` keys derive from these).
    params_model: ClassVar[type[PolicyKnobs]] = PolicyKnobs

    def __init__(self, params: dict[str, Any], model: torch.nn.Module, cfg: ModelConfig, device: torch.device):
        self.params = self.params_model.resolve(self.name, dict(params))
        self.model, self.cfg, self.device = model, cfg, device
        self.scale = cfg.head_dim**-0.5
        self.step_fetch_peak = 0  # most K/V bytes resident on the device at once during the last step
        # evicts_at_prefill: one layer's K/V of the step's prompts, held while that layer selects
        self.step_select_peak = 0
        self.store: PagedKVStore

    @property
    def h2d_bytes(self) -> int:
        """Cumulative host -> device bytes of the copies issued (padding included)."""
        return self.store.transfers.h2d

    @property
    def d2h_bytes(self) -> int:
        """Cumulative device -> host bytes of the copies issued (new K/V into a host store)."""
        return self.store.transfers.d2h

    # --- storage -------------------------------------------------------------------------
    def prepare(self, tokenizer: Any, weights_dir: Path | None) -> None:
        """Offline work that needs the model's tokenizer or weight files (InfiniGen's skewing
        from calibration text); runs once, before ``bind``. ``weights_dir`` is None for dummy weights."""

    def bind(self, store: PagedKVStore) -> None:
        """Attach the K/V store (subclasses add side fields here)."""
        self.store = store

    def store_device(self) -> torch.device:
        """Where the K/V store lives: the compute device, or host memory for offloading policies."""
        return torch.device("cpu") if self.kv_on_host and self.device.type != "meta" else self.device

    def kept_tokens(self, n_seen: int) -> int:
        """Entries a sequence keeps after eviction once it has seen ``n_seen`` tokens."""
        return n_seen

    def token_budget(self, n_seen: int, from_ratio: int) -> int:
        """Entries to keep of ``n_seen``: ``kv_budget_tokens`` if stated, else ``from_ratio``
        (the policy's rounding of its fraction), never below ``min_tokens``, at least 1."""
        stated = self.params.get("kv_budget_tokens")
        kept = from_ratio if stated is None else int(stated)
        return max(1, min(n_seen, max(kept, int(self.params.get("min_tokens") or 0))))

    def prefill_stored(self, n_tokens: int) -> int:
        """Entries a prefill of ``n_tokens`` tokens writes to the store."""
        return self.kept_tokens(n_tokens) if self.evicts_at_prefill else n_tokens

    def prefill_keep(self, layer: int, probs: torch.Tensor | None, batch: BatchMeta) -> torch.Tensor:
        """``evicts_at_prefill`` policies: the prompt tokens ``layer`` keeps [n_keep, kv_heads]
        (ascending, ``n_keep = prefill_stored(T)``), given the prompt's attention probabilities
        [1, KVH, G, T, T] when ``wants_probs``; writes the kept entries' side fields at
        ``batch.write_slots``."""
        raise NotImplementedError

    def select_keep(self, seq: Sequence, slots: torch.Tensor) -> torch.Tensor | None:
        """Entries to keep [layers, n_keep, kv_heads] (indices into ``slots``), or None to keep all."""
        return None

    def evicts_in_place(self) -> bool:
        """Whether a one-entry drop may go through ``eviction_key`` (entries then lose their order)."""
        return type(self).eviction_key is not CachePolicy.eviction_key

    def drop_rule(self) -> tuple[bool, int] | None:
        """How a one-entry drop ranks entries, for the paged path's in-graph drop: (rank by the
        ``score`` field rather than by position, positions below this are never dropped), or
        None if the policy has no such rule. Positions from ``first_protected`` on are kept."""
        return None

    def first_protected(self, n_seen: int) -> int:
        """The first position of the window a drop never touches (the recent tokens)."""
        return n_seen

    def eviction_key(self, seqs: list[Sequence], slots: torch.Tensor) -> torch.Tensor:
        """Rank of every stored entry [layers, B, W, kv_heads] (lowest is evicted first) for
        sequences whose entries sit at ``slots`` [B, W]."""
        raise NotImplementedError

    def device_bytes(self, stored_tokens: int) -> int:
        """K/V bytes resident on the device for ``stored_tokens`` stored entries (persistent part)."""
        return 0 if self.kv_on_host else stored_tokens * self.cfg.kv_bytes_per_token

    def host_bytes(self, stored_tokens: int) -> int:
        """K/V bytes held in host memory."""
        return stored_tokens * self.cfg.kv_bytes_per_token if self.kv_on_host else 0

    # --- the per-layer call --------------------------------------------------------------
    def begin_step(self, step: StepBatch) -> None:
        """Reset per-step state."""
        self.step_fetch_peak = 0
        prompts = sum(m.positions.shape[1] for m in step.prefill) if self.evicts_at_prefill else 0
        self.step_select_peak = prompts * self.token_layer_bytes()

    def attend(self, layer: int, q, k, v, x, k_raw, step: StepBatch) -> torch.Tensor:
        """Attention for ``layer`` over a step's flattened tokens [1, N, ...] -> [1, N, H, D]."""
        nd, parts = step.num_decode, []
        tensors = (q, k, v, x, k_raw)
        if step.decode is not None:
            sub = [t[0, :nd].unsqueeze(1) for t in tensors]  # [B,1,...]
            parts.append(self.attend_batch(layer, *sub, step.decode)[:, 0])
        start = nd
        for meta in step.prefill:
            n = meta.positions.shape[1]
            sub = [t[:, start : start + n] for t in tensors]  # [1,T,...]
            parts.append(self.attend_batch(layer, *sub, meta)[0])
            start += n
        if len(parts) == 1:
            return parts[0].unsqueeze(0)
        return torch.cat(parts, 0).unsqueeze(0)

    def attend_batch(self, layer: int, q, k, v, x, k_raw, batch: BatchMeta) -> torch.Tensor:
        """Store the new K/V and return attention output [B,T,H,D] for ``layer``."""
        if batch.is_prefill and self.evicts_at_prefill:
            return self.prefill_evicting(layer, q, k, v, x, batch)
        host = self.kv_on_host and batch.host_write_slots is not None
        self.store.write(layer, batch.host_write_slots if host else batch.write_slots, k.flatten(0, 1),
                         v.flatten(0, 1))
        self.on_write(layer, batch, k_raw)
        if batch.block_table is not None:  # decode through the paged kernel
            out = self.paged_decode(layer, q[:, 0], batch).unsqueeze(1)
            self.after_attention(layer, x, batch)
            return out
        if batch.is_prefill:  # causal attention over the prompt itself; nothing needs fetching
            kk, vv, mask = k.transpose(1, 2), v.transpose(1, 2), None
        else:
            kk, vv, mask = self.context(layer, k, v, batch)
        out, probs = attention(q, kk, vv, mask, self.scale, self.wants_probs)
        if probs is not None:
            self.observe(layer, probs, batch)
        self.after_attention(layer, x, batch)
        return out

    def prefill_evicting(self, layer: int, q, k, v, x, batch: BatchMeta) -> torch.Tensor:
        """Causal attention over the prompt's own K/V (in hand, not stored), then only the
        entries the policy keeps go to the store, per KV head: the same entries, in the same
        order, as storing the whole prompt and evicting after the step."""
        out, probs = attention(q, k.transpose(1, 2), v.transpose(1, 2), None, self.scale, self.wants_probs)
        keep = self.prefill_keep(layer, probs, batch)  # [n_keep, KVH]
        idx = keep.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        self.store.write(layer, batch.write_slots, k[0].gather(0, idx), v[0].gather(0, idx))
        self.store.memory.transient(self.step_select_peak)  # (a peak, not held after the step)
        self.after_attention(layer, x, batch)
        return out

    def capturable(self) -> bool:
        """Whether a decode step can be captured in a CUDA graph (paged, K/V on the device)."""
        return self.uses_paged_decode() and not self.kv_on_host

    def reserve(self, rows: int, max_len: int) -> None:
        """Grow the device buffers a decode step of ``rows`` rows (sequences up to ``max_len``
        entries) needs, before a captured graph that holds their addresses is looked up."""

    def graph_addresses(self) -> tuple[int, ...]:
        """Addresses of the policy's own buffers a captured decode graph holds (a change means
        the graph is stale)."""
        return ()

    def uses_paged_decode(self) -> bool:
        """Whether decode can run through the paged kernel: the K/V live on the device,
        attention reads every stored entry, and scores (if the policy wants them) come from the
        policy's own kernel call (``paged_decode``: H2O's from the attention pass itself)."""
        if self.kv_on_host or type(self).context is not CachePolicy.context:
            return False
        return not self.wants_probs or type(self).paged_decode is not CachePolicy.paged_decode

    def paged_decode(self, layer: int, q: torch.Tensor, batch: BatchMeta) -> torch.Tensor:
        """Decode attention [B,H,D] straight from the paged store."""
        from backends.kvcache.kernels import ops

        out, _ = ops().paged_decode_attention(
            q, self.store.k[layer], self.store.v[layer], batch.block_table, batch.seq_lens, self.scale,
            batch.block_size,
        )
        return out

    def on_write(self, layer: int, batch: BatchMeta, k_raw: torch.Tensor) -> None:
        """Hook after the new tokens' K/V are stored (side fields)."""

    def context(self, layer: int, k_new, v_new, batch: BatchMeta):
        """Decode: K/V [B,KVH,L,D] the new tokens attend to, and the mask [B,1,1,1,L]."""
        kk = self.gather(self.store.k[layer], batch.slot_idx).transpose(1, 2)
        vv = self.gather(self.store.v[layer], batch.slot_idx).transpose(1, 2)
        return kk, vv, batch.kv_valid[:, None, None, None, :]

    @staticmethod
    def gather(pool: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """Rows of ``pool`` [S, ...] at ``slot_idx`` [B, L] -> [B, L, ...]."""
        return pool.index_select(0, slot_idx.flatten()).view(*slot_idx.shape, *pool.shape[1:])

    def observe(self, layer: int, probs: torch.Tensor, batch: BatchMeta) -> None:
        """Receives attention probabilities when ``wants_probs``."""

    def after_attention(self, layer: int, x: torch.Tensor, batch: BatchMeta) -> None:
        """Hook after a layer's attention (InfiniGen speculates the next layer here)."""

    # --- helpers for host-resident policies ----------------------------------------------
    def fetch_all(self, layer: int, k_new, v_new, batch: BatchMeta):
        """Bring every stored entry of ``layer`` to the device (counted), with the new token in place."""
        kk = self.store.to_device(self.gather(self.store.k[layer], batch.slot_idx), self.device)
        vv = self.store.to_device(self.gather(self.store.v[layer], batch.slot_idx), self.device)
        rows = torch.arange(kk.shape[0], device=self.device)
        kk[rows, batch.prev_len] = k_new[:, 0].to(kk.dtype)  # the new token was computed here
        vv[rows, batch.prev_len] = v_new[:, 0].to(vv.dtype)
        self.count_fetch(kk.numel() * kk.element_size() + vv.numel() * vv.element_size())
        return kk.transpose(1, 2), vv.transpose(1, 2), batch.kv_valid[:, None, None, None, :]

    def token_layer_bytes(self) -> int:
        """K+V bytes of one token in one layer."""
        return self.cfg.kv_bytes_per_token // self.cfg.num_layers

    def count_fetch(self, nbytes: int) -> None:
        """Account ``nbytes`` fetched to the device (already counted as transfers) for one
        layer's attention: they are held on the device while the layer attends."""
        self.step_fetch_peak = max(self.step_fetch_peak, nbytes)
        self.store.memory.transient(nbytes)
