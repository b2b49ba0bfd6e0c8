"""Layer-ahead prefetch of a host-resident K/V store (FlexGen-style): while layer i computes,
layer i+1's K/V are copied from pinned host memory into the other of two device buffers, on a
side CUDA stream ordered by events. A copy is one contiguous range per tensor (the slots from 0
to the last block a decoding sequence holds), so it runs at the link's bandwidth; the buffers
have the store's slot layout, so the paged kernel reads them with the same block tables.
"""

from __future__ import annotations

import torch

from backends.kvcache.kv_store import PagedKVStore


class LayerPrefetcher:
    """Two device buffers per tensor; ``start`` issues layer 0, ``take(i)`` waits for layer i and
    issues layer i+1 (every copy counted by the store)."""

    def __init__(self, store: PagedKVStore, device: torch.device):
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ready: list = [None, None]  # event: buffer holds its layer
        self.free: list = [None, None]  # event: the compute stream is done reading the buffer
        self.slots = 0
        self.layer = -1  # the layer whose copy was issued last

    def _ensure_buffers(self) -> None:
        cap = self.store.k.shape[1]
        if self.buffers and self.buffers[0][0].shape[0] >= cap:
            return
        for kb, vb in self.buffers:
            self.store.memory.free(kb)
            self.store.memory.free(vb)
        shape = self.store.k.shape[1:]
        mem = self.store.memory
        self.buffers = [
            (mem.alloc(torch.empty(shape, dtype=self.store.dtype, device=self.device)),
             mem.alloc(torch.empty(shape, dtype=self.store.dtype, device=self.device)))
            for _ in range(2)
        ]

    def start(self, block_tables: list[list[int]]) -> None:
        """A new step: copy layer 0's used slots."""
        self._ensure_buffers()
        self.slots = self.store.used_slots(block_tables)
        if self.cuda:  # the last step's layers may still read either buffer
            for buf in range(2):
                self.free[buf] = torch.cuda.Event()
                self.free[buf].record(torch.cuda.current_stream())
        self._issue(0)

    def _issue(self, layer: int) -> None:
        buf = layer % 2
        kb, vb = self.buffers[buf]
        n, store = self.slots, self.store
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if self.free[buf] is not None:
                    self.stream.wait_event(self.free[buf])
                kb[:n].copy_(store.k[layer, :n], non_blocking=True)
                vb[:n].copy_(store.v[layer, :n], non_blocking=True)
                self.ready[buf] = torch.cuda.Event()
                self.ready[buf].record(self.stream)
        else:
            kb[:n].copy_(store.k[layer, :n])
            vb[:n].copy_(store.v[layer, :n])
        store.transfers.h2d_host += 2 * n * kb[0].numel() * kb.element_size()
        self.layer = layer

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K/V buffers, [slots, kv_heads, D] each, ready for the compute stream;
        the next layer's copy is issued into the other buffer."""
        if self.layer != layer:  # (not prefetched: a step without start, or layers out of order)
            self._issue(layer)
        buf = layer % 2
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.ready[buf])
        if layer + 1 < self.store.cfg.num_layers:
            other = 1 - buf
            if self.cuda:  # the other buffer was read by the previous layer, already queued
                self.free[other] = torch.cuda.Event()
                self.free[other].record(torch.cuda.current_stream())
            self._issue(layer + 1)
        return self.buffers[buf]

    def bytes_per_copy(self) -> int:
        """Bytes one layer's copy moves (K and V)."""
        return 2 * self.slots * self.store.k[0, 0].numel() * self.store.k.element_size()
