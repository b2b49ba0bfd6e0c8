"""``offload``: the whole K/V in host memory, fetched in full for every layer of every decode
step (FlexGen-style baseline). Layer i+1's K/V are copied while layer i computes
(policies/prefetch.py); on a GPU the paged kernel reads the copied buffers directly."""

from __future__ import annotations

import torch

from backends.kvcache.policies.base import CachePolicy
from backends.kvcache.policies.prefetch import LayerPrefetcher
from backends.kvcache.policies.registry import POLICIES


@POLICIES.register
class OffloadPolicy(CachePolicy):
    name = "offload"
    kv_on_host = True

    def bind(self, store):
        super().bind(store)
        self.prefetcher = LayerPrefetcher(store, self.device)

    def uses_paged_decode(self) -> bool:
        return True  # over the prefetched buffers, which keep the store's slot layout

    def begin_step(self, step):
        super().begin_step(step)
        if step.decode is not None:
            self.prefetcher.start([s.block_table for s in step.decode.seqs])

    def context(self, layer, k_new, v_new, batch):
        kb, vb = self.prefetcher.take(layer)
        kk, vv = self.gather(kb, batch.slot_idx.to(kb.device)), self.gather(vb, batch.slot_idx.to(vb.device))
        rows = torch.arange(kk.shape[0], device=kk.device)
        kk[rows, batch.prev_len] = k_new[:, 0].to(kk.dtype)  # the new token was computed here
        vv[rows, batch.prev_len] = v_new[:, 0].to(vv.dtype)
        self.count_fetch(kk.numel() * kk.element_size() + vv.numel() * vv.element_size())
        return kk.transpose(1, 2), vv.transpose(1, 2), batch.kv_valid[:, None, None, None, :]

    def paged_decode(self, layer, q, batch):
        from backends.kvcache.kernels import ops

        kb, vb = self.prefetcher.take(layer)
        k_new, v_new = self.new_kv
        kb.index_copy_(0, batch.write_slots, k_new.to(kb.dtype))  # the new token was computed here
        vb.index_copy_(0, batch.write_slots, v_new.to(vb.dtype))
        self.step_fetch_peak = max(self.step_fetch_peak, 2 * self.prefetcher.bytes_per_copy())
        out, _ = ops().paged_decode_attention(q, kb, vb, batch.block_table, batch.seq_lens, self.scale,
                                              batch.block_size)
        return out

    def attend_batch(self, layer, q, k, v, x, k_raw, batch):
        if batch.block_table is not None:
            self.new_kv = (k.flatten(0, 1), v.flatten(0, 1))
        return super().attend_batch(layer, q, k, v, x, k_raw, batch)
