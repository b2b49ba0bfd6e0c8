"""Layer-ahead prefetch of a host-resident K/V store (FlexGen-style): while layer i computes,
layer i+1's K/V are copied from pinned host memory into the other of two device buffers, on a
side CUDA stream ordered by events. The buffers have the store's slot layout, so the paged
kernel reads them with the same block tables. Two ways to copy:

- a range (``start``): one contiguous copy per tensor, the slots from 0 to the last block a
  decoding sequence holds, sized on the host;
- pages (``start_paged``, where kernels read mapped pinned memory): a kernel copies the pages
  each sequence's block table holds, sized by the device-side lengths, so the whole step,
  copies and events included, is captured in a CUDA graph.

A layer's new entry can be handed to ``take`` to be written into the store by kernels on the
copy stream, ahead of the next layer's copy: off the step's critical path, since nothing in the
step reads it from the store, and before the next step's copy of that layer on the same stream.
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
        self.batch = None  # paged copies: the decode step's BatchMeta (block tables, lengths)
        self.copy_bytes: torch.Tensor | None = None  # paged copies: bytes per layer, on the device
        self.writing: tuple | None = None  # the entry the copy stream writes; referenced until waited for

    def ensure_buffers(self) -> None:
        """Device buffers as large as the store (before a graph that holds them is captured)."""
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
        self.ensure_buffers()
        self.slots = self.store.used_slots(block_tables)
        self.batch = None
        self._begin()

    def start_paged(self, batch) -> None:
        """A new step inside the forward: copy layer 0's pages of ``batch``'s block tables."""
        self.batch = batch
        bs = batch.block_size
        row_bytes = self.store.k[0, 0].numel() * self.store.k.element_size()
        self.copy_bytes = ((batch.seq_lens + bs - 1) // bs).sum() * (2 * bs * row_bytes)
        self._begin()

    def _begin(self) -> None:
        if self.cuda:  # the last step's layers may still read either buffer
            for buf in range(2):
                self.free[buf] = torch.cuda.Event()
                self.free[buf].record(torch.cuda.current_stream())
        self._issue(0)

    def _issue(self, layer: int, entry: tuple | None = None) -> None:
        buf = layer % 2
        kb, vb = self.buffers[buf]
        n, store = self.slots, self.store
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if self.free[buf] is not None:
                    self.stream.wait_event(self.free[buf])
                if entry is not None:
                    self._write(*entry)
                self._copy(layer, kb, vb, n)
                self.ready[buf] = torch.cuda.Event()
                self.ready[buf].record(self.stream)
        else:
            self._copy(layer, kb, vb, n)
        if self.batch is not None:
            store.transfers.add_h2d_device(self.copy_bytes)
        else:
            store.transfers.h2d_host += 2 * n * kb[0].numel() * kb.element_size()
        self.layer = layer

    def _copy(self, layer: int, kb: torch.Tensor, vb: torch.Tensor, n: int) -> None:
        store = self.store
        if self.batch is None:
            kb[:n].copy_(store.k[layer, :n], non_blocking=True)
            vb[:n].copy_(store.v[layer, :n], non_blocking=True)
            return
        from backends.kvcache.kernels import ops

        b = self.batch
        ops().copy_pages(store.k[layer], kb, b.block_table, b.seq_lens, b.block_size)
        ops().copy_pages(store.v[layer], vb, b.block_table, b.seq_lens, b.block_size)

    def take(self, layer: int, entry: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K/V buffers, [slots, kv_heads, D] each, ready for the compute stream;
        the next layer's copy is issued into the other buffer. ``entry`` (slots, K rows, V rows),
        the layer's new entry, is written into the store: on the copy stream ahead of that copy,
        or on the compute stream where no copy follows (the last layer) or there are no streams."""
        if self.layer != layer:  # (not prefetched: a step without start, or layers out of order)
            self._issue(layer)
        buf = layer % 2
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.ready[buf])
            self.writing = None  # the write issued with this copy is done
        last = layer + 1 >= self.store.cfg.num_layers
        if entry is not None and (last or not self.cuda):
            self._write(layer, *entry)
            entry = None
        if not last:
            other = 1 - buf
            if self.cuda:  # the other buffer was read by the previous layer, already queued
                self.free[other] = torch.cuda.Event()
                self.free[other].record(torch.cuda.current_stream())
            self._issue(layer + 1, None if entry is None else (layer, *entry))
            # freed earlier, the entry's memory could be reused while the copy stream still reads it
            self.writing = entry
        return self.buffers[buf]

    def _write(self, layer: int, slots: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """New K/V rows into the host store's ``slots`` of ``layer``, by kernels (mapped memory)."""
        from backends.kvcache.kernels import ops

        ops().scatter_rows(self.store.k[layer], slots, k_rows)
        ops().scatter_rows(self.store.v[layer], slots, v_rows)

    def bytes_per_copy(self) -> int:
        """Bytes one layer's copy moves (K and V)."""
        return 2 * self.slots * self.store.k[0, 0].numel() * self.store.k.element_size()
