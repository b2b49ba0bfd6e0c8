"""``offload``: the whole K/V in host memory, fetched in full for every layer of every decode
step (FlexGen-style baseline). Layer i+1's K/V are copied while layer i computes
(policies/prefetch.py); on a GPU the paged kernel reads the copied buffers directly.

Where kernels can read and write mapped pinned memory (a GPU), decode is captured in a CUDA
graph like the device-resident policies: a kernel writes the new K/V into the host store and
the layer-ahead copies are kernels sized by the device-side lengths. Elsewhere the copies are
sized on the host and new K/V go through pinned staging, step by step."""

from __future__ import annotations

import torch

from backends.kvcache.kernels import reads_mapped_host
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
        self.entry: tuple | None = None  # decode on mapped memory: the layer's new entry for the store
        # kernels read and write the store in place: mapped pinned memory on a GPU, or the host's
        # own memory (Triton's interpreter on a CPU, where the paged path is tested)
        self.mapped = self.device.type == "cpu" or (store.pin_memory and reads_mapped_host(self.device, store.dtype))
        if self.mapped:  # the copied bytes are counted on the device, also inside a captured graph
            store.transfers.track_device(self.device)

    def uses_paged_decode(self) -> bool:
        return True  # over the prefetched buffers, which keep the store's slot layout

    def capturable(self) -> bool:
        return self.mapped and self.device.type == "cuda"

    def reserve(self, rows: int, max_len: int) -> None:
        self.prefetcher.ensure_buffers()

    def graph_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for pair in self.prefetcher.buffers for t in pair)

    def begin_step(self, step):
        super().begin_step(step)
        decode = step.decode
        if decode is None:
            return
        if not (self.mapped and decode.block_table is not None):
            self.prefetcher.start([s.block_table for s in decode.seqs])
            return
        # the step's kernels issue its copies (a replayed graph runs no Python): every row's new
        # K/V into the host store (padding rows write the scratch slot), and two layers' pages
        # held in the device buffers; the bytes copied are counted on the device
        self.store.transfers.d2h += decode.seq_lens.shape[0] * self.cfg.kv_bytes_per_token
        pages = sum(len(s.block_table) for s in decode.seqs)
        self.step_fetch_peak = 2 * pages * self.store.block_size * self.token_layer_bytes()

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

        if self.mapped:
            if layer == 0:  # the step's first copy is issued inside the forward (a graph holds it)
                self.prefetcher.start_paged(batch)
        else:
            self.step_fetch_peak = max(self.step_fetch_peak, 2 * self.prefetcher.bytes_per_copy())
        # the new K/V into the host store by kernels, off the critical path where they can be
        kb, vb = self.prefetcher.take(layer, self.entry if self.mapped else None)
        k_new, v_new = self.new_kv
        kb.index_copy_(0, batch.write_slots, k_new.to(kb.dtype))  # the new token was computed here
        vb.index_copy_(0, batch.write_slots, v_new.to(vb.dtype))
        out, _ = ops().paged_decode_attention(q, kb, vb, batch.block_table, batch.seq_lens, self.scale,
                                              batch.block_size)
        return out

    def attend_batch(self, layer, q, k, v, x, k_raw, batch):
        if batch.block_table is None:
            return super().attend_batch(layer, q, k, v, x, k_raw, batch)
        self.new_kv = (k.flatten(0, 1), v.flatten(0, 1))
        if not self.mapped:
            return super().attend_batch(layer, q, k, v, x, k_raw, batch)
        # the new K/V for the host store, written by kernels (no staging, no host sync) in paged_decode
        dtype = self.store.dtype
        self.entry = (batch.write_slots, k[:, 0].to(dtype).contiguous(), v[:, 0].to(dtype).contiguous())
        return self.paged_decode(layer, q[:, 0], batch).unsqueeze(1)
