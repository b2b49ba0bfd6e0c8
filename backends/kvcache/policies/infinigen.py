"""``infinigen`` (InfiniGen): the whole K/V in (pinned) host memory; for each layer, the
previous layer speculates which tokens matter and only those are fetched to the device.

Offline "skewing": per query head h, the SVD Wq_h^T = U S V^T gives an orthogonal V whose first
columns carry most of the query's energy; Q V and K V give the same Q K^T. The speculation uses
``r = ceil(partial_weight_ratio x head_dim)`` skewed columns: a partial query weight
(Wq_h^T V[:, :r], from the current layer's attention input, since consecutive layers' inputs
are similar) and a partial key cache (K_h V[:, :r], pre-RoPE keys, kept on the device).
Tokens whose speculated score is within ``alpha`` of the maximum are kept, at most
``kv_budget`` x stored tokens, the same count for every KV head of a sequence. The first and
last layers are not speculated: they fetch everything, as in the original.
"""

from __future__ import annotations

import math

import torch

from backends.kvcache.policies.base import CachePolicy, StepBatch


class InfiniGenPolicy(CachePolicy):
    name = "infinigen"
    kv_on_host = True
    defaults = {"kv_budget": 1.0, "alpha": 4.0, "partial_weight_ratio": 0.3}

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        self.alpha = float(self.params["alpha"])
        self.budget = float(self.params["kv_budget"])
        self.rank = max(1, math.ceil(float(self.params["partial_weight_ratio"]) * cfg.head_dim))
        self.speculated = set(range(1, cfg.num_layers - 1))
        self.q_weight: dict[int, torch.Tensor] = {}  # layer -> [hidden, H*r]
        self.q_bias: dict[int, torch.Tensor | None] = {}
        self.k_skew: dict[int, torch.Tensor] = {}  # layer -> [KVH*D, H*r]
        for layer in self.speculated:
            self._skew(layer)
        self.partial: torch.Tensor | None = None  # [L, slots, H*r] on the device
        self.selection: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _skew(self, layer: int) -> None:
        cfg, r = self.cfg, self.rank
        wq, bq, _, _ = self.model.attention_weights(layer)
        d, heads, group = cfg.head_dim, cfg.num_heads, cfg.num_heads // cfg.num_kv_heads
        if wq.device.type == "meta":
            dev = wq.device
            self.q_weight[layer] = torch.empty(cfg.hidden_size, heads * r, device=dev, dtype=wq.dtype)
            self.q_bias[layer] = None
            self.k_skew[layer] = torch.empty(cfg.num_kv_heads * d, heads * r, device=dev, dtype=wq.dtype)
            return
        qw, kw = [], torch.zeros(cfg.num_kv_heads * d, heads * r, dtype=torch.float32, device=wq.device)
        qb = []
        for h in range(heads):
            wq_h = wq[h * d : (h + 1) * d].float()  # [D, hidden]
            _, _, vh = torch.linalg.svd(wq_h.T, full_matrices=False)  # vh: [D, D]
            a = vh.T[:, :r]  # [D, r]
            qw.append(wq_h.T @ a)
            if bq is not None:
                qb.append(bq[h * d : (h + 1) * d].float() @ a)
            g = h // group
            kw[g * d : (g + 1) * d, h * r : (h + 1) * r] = a
        self.q_weight[layer] = torch.cat(qw, 1).to(wq.dtype)
        self.q_bias[layer] = torch.cat(qb).to(wq.dtype) if qb else None
        self.k_skew[layer] = kw.to(wq.dtype)

    def bind(self, store):
        super().bind(store)
        self._grow_partial()

    def _grow_partial(self) -> None:
        slots = self.store.k.shape[1]
        if self.partial is not None and self.partial.shape[1] >= slots:
            return
        new = torch.zeros(self.cfg.num_layers, slots, self.cfg.num_heads * self.rank, device=self.device,
                          dtype=self.store.dtype)
        if self.partial is not None:
            new[:, : self.partial.shape[1]] = self.partial
        self.partial = new

    def device_bytes(self, stored_tokens: int) -> int:
        """The partial key cache lives on the device."""
        per_token = len(self.speculated) * self.cfg.num_heads * self.rank * self.cfg.dtype_bytes
        return stored_tokens * per_token

    def begin_step(self, step: StepBatch) -> None:
        super().begin_step(step)
        self.selection.clear()
        self._grow_partial()

    def on_write(self, layer, batch, k_raw):
        if layer in self.speculated:
            rows = k_raw.flatten(0, 1)[batch.write_rows].flatten(1)  # [N, KVH*D]
            self.partial[layer][batch.write_slots.to(self.device)] = rows @ self.k_skew[layer]

    def after_attention(self, layer, x, batch):
        nxt = layer + 1
        if batch.is_prefill or nxt not in self.speculated or self.device.type == "meta":
            return  # (a meta dry run has no scores to rank: the layer fetches everything)
        cfg, r = self.cfg, self.rank
        b = x.shape[0]
        q = x[:, 0] @ self.q_weight[nxt]
        if self.q_bias[nxt] is not None:
            q = q + self.q_bias[nxt]
        q = q.view(b, cfg.num_heads, r)
        slot_idx = batch.slot_idx.to(self.device)
        keys = self.partial[nxt][slot_idx].view(b, -1, cfg.num_heads, r)  # [B,L,H,r]
        scores = torch.einsum("bhr,blhr->bhl", q.float(), keys.float()) * self.scale
        prev = torch.arange(scores.shape[-1], device=self.device) < batch.prev_len.unsqueeze(1)  # [B,L]
        scores = scores.masked_fill(~prev[:, None], float("-inf"))
        per_kv = scores.view(b, cfg.num_kv_heads, -1, scores.shape[-1]).amax(dim=2)  # [B,KVH,L]
        top = per_kv.amax(dim=-1, keepdim=True)
        count = (per_kv >= top - self.alpha).sum(-1).amax(-1)  # [B]: same count for all heads
        cap = torch.tensor([max(1, math.ceil(self.budget * n)) for n in batch.stored_before], device=self.device)
        keep = torch.minimum(torch.minimum(count, cap), batch.prev_len)
        width = int(keep.max()) if b else 0
        width = max(width, 1)
        ranked = per_kv.topk(width, dim=-1).indices  # [B,KVH,K] best first
        ok = torch.arange(width, device=self.device) < keep[:, None, None]
        sentinel = per_kv.shape[-1]
        idx, _ = torch.where(ok, ranked, sentinel).sort(dim=-1)  # ascending = original order
        ok = idx < sentinel
        idx = idx.clamp(max=sentinel - 1)
        self.selection[nxt] = (idx, ok, int(keep.sum()))

    def context(self, layer, k_new, v_new, batch):
        if layer not in self.selection:
            return self.fetch_all(layer, k_new, v_new, batch)
        idx, ok, n_tokens = self.selection.pop(layer)
        b, kvh, width = idx.shape
        slot_idx = batch.slot_idx.to(self.device)
        sel = slot_idx.gather(1, idx.flatten(1)).view(b, kvh, width).to(self.store.device)
        heads = torch.arange(kvh, device=self.store.device).view(1, kvh, 1)
        kk = self.store.k[layer][sel, heads].to(self.device, non_blocking=True)  # [B,KVH,K,D]
        vv = self.store.v[layer][sel, heads].to(self.device, non_blocking=True)
        self.count_fetch(n_tokens * self.token_layer_bytes())
        kk = torch.cat([kk, k_new.transpose(1, 2).to(kk.dtype)], dim=2)
        vv = torch.cat([vv, v_new.transpose(1, 2).to(vv.dtype)], dim=2)
        mask = torch.cat([ok, torch.ones(b, kvh, 1, dtype=torch.bool, device=self.device)], dim=2)
        return kk, vv, mask[:, :, None, None, :]
