"""Persistent per-step decode metadata (token ids, positions, write slots, lengths, block
tables) and the CUDA graphs that replay a decode step over them.

The buffers live on the device at fixed addresses; each step fills one pinned host staging
buffer of the same layout and sends it with one asynchronous copy (no device-to-host sync). A
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
    """Device buffers a decode step reads, staged in one pinned host buffer of the same layout
    and sent with a single asynchronous copy per step (the host work between graph replays is
    what keeps small batches from the bandwidth roofline)."""

    FIELDS = ("ids", "pos", "slot", "lens", "drop", "first_recent")  # drop: 1 = drop one entry in place

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, device: torch.device):
        self.max_batch, self.width, self.block_size, self.device = max_batch, max_blocks_per_seq, block_size, device
        # one flat int64 buffer: each field [max_batch], then the block table [max_batch, width]
        # last, so the rows a step uses are one contiguous prefix
        self._table_at = len(self.FIELDS) * max_batch
        size = self._table_at + max_batch * max_blocks_per_seq
        # two staging buffers, used in turn: with asynchronous scheduling a step is filled while
        # the previous step's copy may still be queued behind the one before it
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._sent = [torch.cuda.Event() if pin else None for _ in range(2)]  # each buffer's last copy
        self._turn = 0
        self._dev = torch.zeros(size, dtype=torch.int64, device=device)
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, self._dev[i * max_batch : (i + 1) * max_batch])
        self.table = self._dev[self._table_at :].view(max_batch, max_blocks_per_seq)

    @property
    def _host(self) -> torch.Tensor:
        return self._hosts[self._turn]

    @property
    def _np(self):
        return self._host.numpy()

    @property
    def slot_h(self) -> torch.Tensor:
        """The write slots of the last filled step, on the host."""
        return self._host[2 * self.max_batch : 3 * self.max_batch]

    def _field(self, name: str):
        i = self.FIELDS.index(name) * self.max_batch
        return self._np[i : i + self.max_batch]

    def fill(self, seqs: list[Sequence], rows: int, drop: list[int] | None = None,
             first_recent: list[int] | None = None) -> tuple[int, ...]:
        """Stage ``seqs``' metadata in the first ``rows`` rows (extra rows are padding), with the
        rows that drop one entry in place after the step and the window each keeps, and send it
        in one copy; returns the entries each sequence stored before this step."""
        bs, b = self.block_size, len(seqs)
        self._turn = 1 - self._turn
        if self._sent[self._turn] is not None:  # this buffer's last copy must have left it
            self._sent[self._turn].synchronize()
        before = tuple(s.num_stored for s in seqs)
        width = max((len(s.block_table) for s in seqs), default=1)
        if width > self.width:
            raise ValueError(f"a sequence holds {width} blocks; the decode buffers hold {self.width}")
        pad = rows - b
        values = {
            "ids": [s.last_token_id for s in seqs] + [0] * pad,
            "pos": [s.num_seen for s in seqs] + [0] * pad,
            "slot": [s.block_table[n // bs] * bs + n % bs for s, n in zip(seqs, before, strict=True)]
            + [SCRATCH_SLOT] * pad,
            "lens": [n + 1 for n in before] + [1] * pad,
            "drop": (drop or [0] * b) + [0] * pad,
            "first_recent": (first_recent or [0] * b) + [0] * pad,
        }
        for name, vals in values.items():
            self._field(name)[:rows] = vals
        table = self._np[self._table_at : self._table_at + rows * self.width].reshape(rows, self.width)
        table[:] = 0
        for r, s in enumerate(seqs):
            table[r, : len(s.block_table)] = s.block_table
        n = self._table_at + rows * self.width
        self._dev[:n].copy_(self._host[:n], non_blocking=True)
        if self._sent[self._turn] is not None:
            self._sent[self._turn].record()
        return before

    def fill_padding(self, rows: int) -> None:
        """Rows that touch only the scratch slot (for warm-up and capture)."""
        for name, v in (("ids", 0), ("pos", 0), ("slot", SCRATCH_SLOT), ("lens", 1), ("drop", 0), ("first_recent", 0)):
            getattr(self, name)[:rows].fill_(v)
        self.table[:rows].fill_(0)

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
    Graphs are dropped when the K/V store or a policy buffer they read is reallocated (it grew):
    they hold its addresses (``storage_key``)."""

    def __init__(self, max_batch: int, storage_key: Callable[[], tuple[int, ...]]):
        self.buckets = buckets(max_batch)
        self.storage_key = storage_key
        self.captured: dict[int, CapturedStep] = {}
        self.pool = None
        self._key = storage_key()

    def bucket(self, b: int) -> int:
        """The smallest bucket that holds ``b`` rows."""
        return next(x for x in self.buckets if x >= b)

    def get(self, rows: int, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]],
            pad: Callable[[], None]) -> CapturedStep:
        """The graph for ``rows`` (captured now if needed: ``pad`` fills harmless metadata, one
        eager ``forward`` compiles the kernels, then the capture)."""
        if self.storage_key() != self._key:
            self.captured.clear()
            self.pool = None
            self._key = self.storage_key()
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
