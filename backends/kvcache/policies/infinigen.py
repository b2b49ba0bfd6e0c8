"""``infinigen`` (InfiniGen): the whole K/V in (pinned) host memory; for each layer, the
previous layer speculates which tokens matter and only those are fetched to the device.

Speculation works on ``r = ceil(partial_weight_ratio x head_dim)`` columns: a partial query
weight applied to the current layer's attention input (consecutive layers' inputs are
similar) and a partial key cache of the same columns, kept on the device. The columns are
chosen offline ("skewing"):

- models without RoPE (OPT): per query head h, the SVD Wq_h^T = U S V^T gives an orthogonal V
  whose first columns carry most of the query's energy; Q V and K V give the same Q K^T, so the
  partial query is Wq_h^T V[:, :r] and the partial keys are K_h V[:, :r] (r per query head);
- RoPE models (Llama): the true score is between *rotated* queries and keys, and a rotation
  only commutes with a change of basis that maps each 2-D RoPE plane onto itself, so the skew
  is a choice of whole planes: per KV head, the ``ceil(r / 2)`` planes with the largest mean
  |q plane| x |k plane| in a calibration forward (``_calibrate``), shared by the query heads
  of its group, so the partial key cache is r columns of the rotated K. The partial query is
  rotated at the decoded token's position, so a speculated score is exactly the true score
  restricted to those planes. (Scoring unrotated keys, as a plain SVD skew does, ranks
  tokens on SmolLM2 little better than chance: top-k recall 0.35 at budget 0.25.)

The current layer's input is normalised with its own norm weight; for Llama the partial query
weight divides it out and applies the next layer's (RMSNorm has no bias, so this recovers the
next layer's input exactly up to what the layer in between adds).

A KV head ranks tokens by its query heads' summed softmax over the speculated scores, in log
space. Tokens within ``alpha`` of the maximum are kept, at most ``kv_budget`` x stored tokens (or
``kv_budget_tokens``; all of them up to ``min_tokens``),
the same count for every KV head of a sequence. The first and last layers are not
speculated: they fetch everything, as in the original.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from backends.kvcache.policies.base import CachePolicy, StepBatch, attention
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs

CALIBRATION_TOKENS = 64


class InfiniGenKnobs(PolicyKnobs):
    alpha: float = Field(default=4.0, ge=0)
    partial_weight_ratio: float = Field(default=0.3, gt=0, le=1)


@POLICIES.register
class InfiniGenPolicy(CachePolicy):
    name = "infinigen"
    kv_on_host = True
    lossy = True
    params_model = InfiniGenKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        self.alpha = float(self.params["alpha"])
        self.budget = float(self.params["kv_budget"])
        rank = max(1, math.ceil(float(self.params["partial_weight_ratio"]) * cfg.head_dim))
        self.rope = cfg.arch == "llama"
        if self.rope:  # whole RoPE planes: an even number of columns
            self.planes = min(cfg.head_dim // 2, -(-rank // 2))
            rank = 2 * self.planes
            from backends.kvcache.models.llama import rope_inv_freq

            self.inv_freq = rope_inv_freq(cfg)
        self.rank = rank
        self.speculated = set(range(1, cfg.num_layers - 1))
        self.q_weight: dict[int, torch.Tensor] = {}  # layer -> [hidden, H*r]
        self.q_bias: dict[int, torch.Tensor | None] = {}
        self.k_skew: dict[int, torch.Tensor] = {}  # no RoPE: layer -> [KVH*D, H*r]
        self.k_cols: dict[int, torch.Tensor] = {}  # RoPE: layer -> [KVH*r] columns of the flat [KVH*D] keys
        self.k_freq: dict[int, torch.Tensor] = {}  # RoPE: layer -> [KVH*r] rotation frequency of each column
        self.q_freq: dict[int, torch.Tensor] = {}  # RoPE: layer -> [H*r] the same for the partial query
        # partial keys per token and layer: one set of columns per KV head (RoPE) or query head (SVD)
        self.key_heads = cfg.num_kv_heads if self.rope else cfg.num_heads
        stats = self._calibrate() if self.rope and self.model.embed_tokens.weight.device.type != "meta" else {}
        for layer in self.speculated:
            self._skew(layer, stats.get(layer))
        self.partial: torch.Tensor | None = None  # [L, slots, key_heads*r] on the device
        self.selection: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _norm_weight(self, layer: int) -> torch.Tensor | None:
        """The RMSNorm weight in front of ``layer``'s attention (Llama), else None."""
        if not self.rope:
            return None
        return self.model.layers[layer].input_layernorm.weight

    def _skew(self, layer: int, stats) -> None:
        cfg, r = self.cfg, self.rank
        wq, bq, _, _ = self.model.attention_weights(layer)
        d, heads, group = cfg.head_dim, cfg.num_heads, cfg.num_heads // cfg.num_kv_heads
        if wq.device.type == "meta":
            dev = wq.device
            self.q_weight[layer] = torch.empty(cfg.hidden_size, heads * r, device=dev, dtype=wq.dtype)
            self.q_bias[layer] = None
            if self.rope:
                self.k_cols[layer] = torch.zeros(cfg.num_kv_heads * r, dtype=torch.long, device=dev)
                self.k_freq[layer] = torch.zeros(cfg.num_kv_heads * r, device=dev)
                self.q_freq[layer] = torch.zeros(heads * r, device=dev)
            else:
                self.k_skew[layer] = torch.empty(cfg.num_kv_heads * d, heads * r, device=dev, dtype=wq.dtype)
            return
        if self.rope:
            self._skew_rope(layer, wq, bq, stats)
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

    def _skew_rope(self, layer, wq, bq, stats) -> None:
        cfg, p = self.cfg, self.planes
        d, half, group = cfg.head_dim, cfg.head_dim // 2, cfg.num_heads // cfg.num_kv_heads
        q_mag, k_mag = stats  # mean |plane| of rotated queries [H, D/2] and keys [KVH, D/2]
        # a plane's typical share of a score is |q plane| x |k plane|; the query heads of a
        # group share their KV head's columns, so the partial key cache is columns of K
        energy = q_mag.view(cfg.num_kv_heads, group, half).sum(1) * k_mag
        planes = energy.topk(p, dim=1).indices.sort(dim=1).values  # [KVH, p]
        cols = torch.cat([planes, planes + half], dim=1)  # [KVH, r]: first halves, then their partners
        k_cols = (cols + d * torch.arange(cfg.num_kv_heads).unsqueeze(1)).flatten()
        head_cols = cols.repeat_interleave(group, 0)  # [H, r]
        q_rows = (head_cols + d * torch.arange(cfg.num_heads).unsqueeze(1)).flatten()
        # x arrives normalised with the previous layer's weight: swap it for this layer's
        w_here, w_prev = self._norm_weight(layer).float(), self._norm_weight(layer - 1).float()
        ratio = torch.where(w_prev.abs() > 0, w_here / w_prev, torch.zeros_like(w_here))
        self.q_weight[layer] = (wq.float()[q_rows] * ratio).T.contiguous().to(wq.dtype)
        self.q_bias[layer] = None if bq is None else bq[q_rows]
        self.k_cols[layer] = k_cols.to(wq.device)
        self.k_freq[layer] = self.inv_freq[cols.flatten() % half].to(wq.device)
        self.q_freq[layer] = self.inv_freq[head_cols.flatten() % half].to(wq.device)

    @torch.inference_mode()
    def _calibrate(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Mean magnitude of every RoPE plane of the rotated queries and keys, per layer and
        head, over one forward of a fixed random token sequence (the activations' scale per
        plane is mostly a property of the weights, not of the text: on SmolLM2 this choice
        recalls nearly as many top tokens as one calibrated on real text)."""
        cfg, half = self.cfg, self.cfg.head_dim // 2
        gen = torch.Generator().manual_seed(0)
        dev = self.model.embed_tokens.weight.device
        ids = torch.randint(0, cfg.vocab_size, (1, CALIBRATION_TOKENS), generator=gen).to(dev)
        pos = torch.arange(CALIBRATION_TOKENS, device=dev).unsqueeze(0)
        causal = torch.ones(CALIBRATION_TOKENS, CALIBRATION_TOKENS, dtype=torch.bool, device=dev).tril()
        stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        scale = self.scale

        class Recorder:
            def attend(self, layer, q, k, v, x, k_raw):
                def mag(t):  # [1,T,heads,D] -> [heads, D/2]
                    return t[0].float().view(t.shape[1], t.shape[2], 2, half).norm(dim=2).mean(0)

                stats[layer] = (mag(q).cpu(), mag(k).cpu())
                out, _ = attention(q, k.transpose(1, 2), v.transpose(1, 2), causal, scale, False)
                return out

        self.model(ids, pos, Recorder())
        return stats

    def _rotate(self, t: torch.Tensor, pos: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """RoPE on partial rows t [N, heads*r] at positions pos [N], each head laid out as
        (plane first halves, their partners), as ``rotate_half`` pairs them."""
        ang = pos.unsqueeze(1).float() * freq.to(t.device)  # [N, heads*r]
        cos, sin = ang.cos().to(t.dtype), ang.sin().to(t.dtype)
        x = t.view(t.shape[0], -1, 2, self.planes)
        rot = torch.stack([-x[:, :, 1], x[:, :, 0]], dim=2).view_as(t)
        return t * cos + rot * sin

    def bind(self, store):
        super().bind(store)
        self._grow_partial()
        self.uva = self._probe_uva()  # GPU: selected rows are gathered from host memory in place
        self.stream = torch.cuda.Stream(self.device) if self.uva else None

    def _grow_partial(self) -> None:
        slots = self.store.k.shape[1]
        if self.partial is not None and self.partial.shape[1] >= slots:
            return
        new = torch.zeros(self.cfg.num_layers, slots, self.key_heads * self.rank, device=self.device,
                          dtype=self.store.dtype)
        self.store.memory.alloc(new)
        if self.partial is not None:
            new[:, : self.partial.shape[1]] = self.partial
            self.store.memory.free(self.partial)
        self.partial = new

    def device_bytes(self, stored_tokens: int) -> int:
        """The partial key cache lives on the device."""
        per_token = len(self.speculated) * self.key_heads * self.rank * self.cfg.dtype_bytes
        return stored_tokens * per_token

    def begin_step(self, step: StepBatch) -> None:
        super().begin_step(step)
        self.selection.clear()
        self._grow_partial()
        self.step_meta = None  # per step, not per layer: the decode slots on the device and the caps
        if step.decode is not None and step.decode.slot_idx is not None:
            stored = step.decode.stored_before
            caps = [self.token_budget(n, math.ceil(self.budget * n)) for n in stored]
            floors = [min(n, int(self.params["min_tokens"])) for n in stored]
            self.step_meta = (step.decode.slot_idx.to(self.device), torch.tensor(caps, device=self.device),
                              torch.tensor(floors, device=self.device), max(caps + floors, default=1))

    def on_write(self, layer, batch, k_raw):
        if layer not in self.speculated:
            return
        rows = k_raw.flatten(0, 1).flatten(1)  # [N, KVH*D]
        if self.rope:
            pos = batch.positions.flatten()
            part = self._rotate(rows[:, self.k_cols[layer]], pos, self.k_freq[layer])
        else:
            part = rows @ self.k_skew[layer]
        self.partial[layer][batch.write_slots.to(self.device)] = part.to(self.partial.dtype)

    def after_attention(self, layer, x, batch):
        nxt = layer + 1
        if batch.is_prefill or nxt not in self.speculated or self.device.type == "meta":
            return  # (a meta dry run has no scores to rank: the layer fetches everything)
        cfg, r = self.cfg, self.rank
        b = x.shape[0]
        q = x[:, 0] @ self.q_weight[nxt]
        if self.q_bias[nxt] is not None:
            q = q + self.q_bias[nxt]
        if self.rope:
            q = self._rotate(q, batch.positions[:, 0], self.q_freq[nxt])
        kh = self.key_heads
        q = q.view(b, kh, cfg.num_heads // kh, r)
        slot_idx, caps, floors, max_cap = self.step_meta
        keys = self.partial[nxt][slot_idx].view(b, -1, kh, r)  # [B,L,key_heads,r]
        scores = torch.einsum("bkgr,blkr->bkgl", q.float(), keys.float()) * self.scale
        scores = scores.reshape(b, cfg.num_kv_heads, -1, scores.shape[-1])  # [B,KVH,group,L]
        prev = torch.arange(scores.shape[-1], device=self.device) < batch.prev_len.unsqueeze(1)  # [B,L]
        scores = scores.masked_fill(~prev[:, None, None], float("-inf"))
        # rank a KV head's tokens by the attention its query heads together would give them
        # (what the layer's output depends on), in log space so alpha reads as on scores
        per_kv = torch.softmax(scores, dim=-1).sum(dim=2).log()  # [B,KVH,L]
        top = per_kv.amax(dim=-1, keepdim=True)
        # tokens per KV head: the mean over heads of those within alpha of the head's best (as
        # the original computes it), the budget a ceiling on it and ``min_tokens`` a floor
        count = (per_kv >= top - self.alpha).sum(-1).float().mean(-1).ceil().long()  # [B]
        keep = torch.minimum(torch.maximum(torch.minimum(count, caps), floors), batch.prev_len)
        width = max(1, min(max_cap, scores.shape[-1]))  # known here: no host sync
        ranked = per_kv.topk(width, dim=-1).indices  # [B,KVH,K] best first
        ok = torch.arange(width, device=self.device) < keep[:, None, None]
        sentinel = per_kv.shape[-1]
        idx, _ = torch.where(ok, ranked, sentinel).sort(dim=-1)  # ascending = original order
        ok = idx < sentinel
        idx = idx.clamp(max=sentinel - 1)
        fetched = self._prefetch(nxt, slot_idx, idx, ok, keep) if self.uva else None
        self.selection[nxt] = (idx, ok, fetched)

    def _probe_uva(self) -> bool:
        """Whether the GPU can read the pinned host store in place (mapped pinned memory)."""
        if self.device.type != "cuda" or not self.store.pin_memory:
            return False
        from backends.kvcache.kernels import ops

        src = torch.arange(64, dtype=self.store.dtype).view(4, 16).pin_memory()
        idx = torch.tensor([2, 0, 3], device=self.device)
        ok = torch.tensor([True, False, True], device=self.device)
        try:
            out = ops().gather_rows(src, idx, ok, torch.empty(3, 16, dtype=src.dtype, device=self.device))
            return bool(torch.equal(out.cpu(), torch.stack([src[2], torch.zeros(16, dtype=src.dtype), src[3]])))
        except Exception:  # noqa: BLE001  (a driver without mapped pinned memory: fall back to host gathers)
            return False

    def _prefetch(self, layer, slot_idx, idx, ok, keep):
        """Gather layer ``layer``'s selected K/V straight from pinned host memory on the side
        stream (ordered after the speculation by an event); returns (k, v, ready event)."""
        from backends.kvcache.kernels import ops

        b, kvh, width = idx.shape
        heads = torch.arange(kvh, device=self.device).view(1, kvh, 1)
        rows = (slot_idx.gather(1, idx.flatten(1)).view(b, kvh, width) * kvh + heads).flatten()
        d = self.cfg.head_dim
        spec_done = torch.cuda.Event()
        spec_done.record()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(spec_done)
            kk = torch.empty(b, kvh, width, d, dtype=self.store.dtype, device=self.device)
            vv = torch.empty_like(kk)
            flat_ok = ok.flatten()
            ops().gather_rows(self.store.k[layer].view(-1, d), rows, flat_ok, kk.view(-1, d))
            ops().gather_rows(self.store.v[layer].view(-1, d), rows, flat_ok, vv.view(-1, d))
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.store.transfers.add_h2d_device(keep.sum() * (kvh * 2 * d * self.store.k.element_size()))
        return kk, vv, ready

    def context(self, layer, k_new, v_new, batch):
        if layer not in self.selection:
            return self.fetch_all(layer, k_new, v_new, batch)
        idx, ok, fetched = self.selection.pop(layer)
        b, kvh, width = idx.shape
        if fetched is not None:
            kk, vv, ready = fetched
            torch.cuda.current_stream().wait_event(ready)
            kk.record_stream(torch.cuda.current_stream())
            vv.record_stream(torch.cuda.current_stream())
        else:
            slot_idx = self.step_meta[0]
            sel = slot_idx.gather(1, idx.flatten(1)).view(b, kvh, width).to(self.store.device)
            heads = torch.arange(kvh, device=self.store.device).view(1, kvh, 1)
            kk = self.store.to_device(self.store.k[layer][sel, heads], self.device)  # [B,KVH,K,D]
            vv = self.store.to_device(self.store.v[layer][sel, heads], self.device)
        self.count_fetch(kk.numel() * kk.element_size() + vv.numel() * vv.element_size())
        kk = torch.cat([kk, k_new.transpose(1, 2).to(kk.dtype)], dim=2)
        vv = torch.cat([vv, v_new.transpose(1, 2).to(vv.dtype)], dim=2)
        mask = torch.cat([ok, torch.ones(b, kvh, 1, dtype=torch.bool, device=self.device)], dim=2)
        return kk, vv, mask[:, :, None, None, :]
