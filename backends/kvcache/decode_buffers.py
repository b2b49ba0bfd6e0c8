"""Persistent per-step decode metadata (token ids, positions, write slots, lengths, block
tables) and the CUDA graphs that replay a decode step over them.

The buffers live on the device at fixed addresses; each step fills pinned host staging copies
in Python and sends them with one asynchronous copy per buffer (no device-to-host sync). A
captured graph per batch-size bucket (1, 2, 4, 8, then multiples of 8) replays the whole decode
forward, greedy argmax included; padded rows write to the scratch slot and read one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from backends.kvcache.kv_store import SCRATCH_SLOT
from backends.kvcache.policies.base import BatchMeta
from backends.kvcache.sequence import Sequence


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every multiple of 8 up to ``max_batch``."""
    out = [b for b in (1, 2, 4) if b < max_batch]
    out += list(range(8, max_batch, 8))
    return [*out, max_batch]


class DecodeBuffers:
    """Device buffers a decode step reads, and their pinned host staging twins."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, device: torch.device):
        self.max_batch, self.width, self.block_size, self.device = max_batch, max_blocks_per_seq, block_size, device
        pin = device.type == "cuda"

        def pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(*shape, dtype=torch.int64, pin_memory=pin)
            return host, torch.zeros(*shape, dtype=torch.int64, device=device)

        self.ids_h, self.ids = pair(max_batch)
        self.pos_h, self.pos = pair(max_batch)
        self.slot_h, self.slot = pair(max_batch)
        self.len_h, self.lens = pair(max_batch)
        self.table_h, self.table = pair(max_batch, max_blocks_per_seq)
        self.drop_h, self.drop = pair(max_batch)  # 1: drop one entry in place after this step
        self.recent_h, self.first_recent = pair(max_batch)  # first position such a drop keeps

    def fill(self, seqs: list[Sequence], rows: int) -> tuple[int, ...]:
        """Stage ``seqs``' metadata in the first ``rows`` rows (extra rows are padding) and send
        it; returns the entries each sequence stored before this step."""
        bs, b = self.block_size, len(seqs)
        before = tuple(s.num_stored for s in seqs)
        ids = [s.last_token_id for s in seqs]
        pos = [s.num_seen for s in seqs]
        slot = [s.block_table[n // bs] * bs + n % bs for s, n in zip(seqs, before, strict=True)]
        lens = [n + 1 for n in before]
        pad = rows - b
        self.ids_h[:rows] = torch.tensor(ids + [0] * pad)
        self.pos_h[:rows] = torch.tensor(pos + [0] * pad)
        self.slot_h[:rows] = torch.tensor(slot + [SCRATCH_SLOT] * pad)
        self.len_h[:rows] = torch.tensor(lens + [1] * pad)
        width = max((len(s.block_table) for s in seqs), default=1)
        if width > self.width:
            raise ValueError(f"a sequence holds {width} blocks; the decode buffers hold {self.width}")
        table = self.table_h[:rows]
        table.zero_()
        for r, s in enumerate(seqs):
            table[r, : len(s.block_table)] = torch.tensor(s.block_table)
        for host, dev in ((self.ids_h, self.ids), (self.pos_h, self.pos), (self.slot_h, self.slot),
                          (self.len_h, self.lens), (self.table_h, self.table)):
            dev[:rows].copy_(host[:rows], non_blocking=True)
        return before

    def fill_drops(self, drop: list[int], first_recent: list[int], rows: int) -> None:
        """Stage and send which rows drop one entry in place, and the window each keeps."""
        pad = rows - len(drop)
        self.drop_h[:rows] = torch.tensor(drop + [0] * pad)
        self.recent_h[:rows] = torch.tensor(first_recent + [0] * pad)
        self.drop[:rows].copy_(self.drop_h[:rows], non_blocking=True)
        self.first_recent[:rows].copy_(self.recent_h[:rows], non_blocking=True)

    def fill_padding(self, rows: int) -> None:
        """Rows that touch only the scratch slot (for warm-up and capture)."""
        for t, v in ((self.ids, 0), (self.pos, 0), (self.slot, SCRATCH_SLOT), (self.lens, 1), (self.table, 0),
                     (self.drop, 0), (self.first_recent, 0)):
            t[:rows].fill_(v)

    def meta(self, rows: int, seqs: list[Sequence], before: tuple[int, ...]) -> BatchMeta:
        """The decode BatchMeta over the first ``rows`` rows (views of the persistent buffers)."""
        return BatchMeta(
            is_prefill=False,
            seqs=seqs,
            positions=self.pos[:rows].view(rows, 1),
            write_slots=self.slot[:rows],
            stored_before=before,
            block_table=self.table[:rows],
            seq_lens=self.lens[:rows],
            block_size=self.block_size,
            host_write_slots=self.slot_h[:rows].clone(),
        )


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [rows] greedy tokens
    logits: torch.Tensor  # [rows, vocab] float32


class DecodeGraphs:
    """One CUDA graph per batch-size bucket, captured on first use, sharing one memory pool.
    Graphs are dropped when the K/V store is reallocated (it grew): they hold its addresses."""

    def __init__(self, max_batch: int, storage_ptr: Callable[[], int]):
        self.buckets = buckets(max_batch)
        self.storage_ptr = storage_ptr
        self.captured: dict[int, CapturedStep] = {}
        self.pool = None
        self._ptr = storage_ptr()

    def bucket(self, b: int) -> int:
        """The smallest bucket that holds ``b`` rows."""
        return next(x for x in self.buckets if x >= b)

    def get(self, rows: int, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]],
            pad: Callable[[], None]) -> CapturedStep:
        """The graph for ``rows`` (captured now if needed: ``pad`` fills harmless metadata, one
        eager ``forward`` compiles the kernels, then the capture)."""
        if self.storage_ptr() != self._ptr:
            self.captured.clear()
            self.pool = None
            self._ptr = self.storage_ptr()
        step = self.captured.get(rows)
        if step is None:
            pad()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                tokens, logits = forward()
            self.pool = graph.pool()
            step = self.captured[rows] = CapturedStep(graph, tokens, logits)
        return step
