"""Paged physical K/V storage: one pool per tensor, indexed by slot = block * block_size + offset.

Storage grows lazily (doubling, up to the budget) so a large budget costs memory only when used;
the block manager, not this class, enforces the budget. Slot 0's block is a scratch block that
padded batch entries point to.
"""

from __future__ import annotations

import torch

from backends.kvcache.block_manager import FIRST_BLOCK
from backends.kvcache.config import ModelConfig

SCRATCH_SLOT = 0


class PagedKVStore:
    """K and V of every layer, [layers, slots, kv_heads, head_dim], plus per-slot side fields."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        pin_memory: bool = False,
        preallocate: bool = False,
    ):
        self.cfg, self.block_size, self.device, self.dtype = cfg, block_size, device, dtype
        self.pin_memory = pin_memory and device.type == "cpu" and torch.cuda.is_available()
        self.max_blocks = FIRST_BLOCK + num_blocks
        self.fields: dict[str, torch.Tensor] = {}  # name -> [layers, slots, kv_heads, ...]
        self._field_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        start = self.max_blocks if preallocate else min(self.max_blocks, FIRST_BLOCK + 4)
        self.k = self._new((cfg.num_kv_heads, cfg.head_dim), dtype, start)
        self.v = self._new((cfg.num_kv_heads, cfg.head_dim), dtype, start)

    @property
    def capacity_blocks(self) -> int:
        """Blocks physically allocated (including the scratch block)."""
        return self.k.shape[1] // self.block_size

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype, blocks: int) -> torch.Tensor:
        size = (self.cfg.num_layers, blocks * self.block_size, *shape)
        return torch.zeros(size, dtype=dtype, device=self.device, pin_memory=self.pin_memory)

    def add_field(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """A per-layer, per-slot side tensor kept in step with K/V (scores, positions)."""
        self._field_specs[name] = (shape, dtype)
        self.fields[name] = self._new(shape, dtype, self.capacity_blocks)

    def ensure_blocks(self, block_ids: list[int]) -> None:
        """Grow physical storage so every block in ``block_ids`` exists."""
        need = max(block_ids, default=0) + 1
        if need <= self.capacity_blocks:
            return
        blocks = min(self.max_blocks, max(need, 2 * self.capacity_blocks))

        def grown(old: torch.Tensor, shape, dtype) -> torch.Tensor:
            new = self._new(shape, dtype, blocks)
            new[:, : old.shape[1]] = old
            return new

        kv_shape = (self.cfg.num_kv_heads, self.cfg.head_dim)
        self.k = grown(self.k, kv_shape, self.dtype)
        self.v = grown(self.v, kv_shape, self.dtype)
        for name, (shape, dtype) in self._field_specs.items():
            self.fields[name] = grown(self.fields[name], shape, dtype)

    def slots(self, block_tables: list[list[int]], lengths: list[int], width: int | None = None) -> torch.Tensor:
        """Slot ids [B, width] of each sequence's first ``lengths[b]`` entries; padding -> scratch slot."""
        bs = self.block_size
        width = width if width is not None else max(lengths, default=0)
        nblk = -(-width // bs)
        table = torch.zeros(len(block_tables), max(nblk, 1), dtype=torch.long)
        for b, bt in enumerate(block_tables):
            n = min(len(bt), nblk)
            if n:
                table[b, :n] = torch.as_tensor(bt[:n])
        slot = (table.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)[:, :width]
        valid = torch.arange(width).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)
        return torch.where(valid, slot, SCRATCH_SLOT).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v rows [N, kv_heads, head_dim] at ``slots`` [N] of ``layer``."""
        self.k[layer].index_copy_(0, slots, k.to(self.device, self.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.device, self.dtype))

    def compact(self, seq_slots: torch.Tensor, keep: torch.Tensor) -> None:
        """Keep, per layer and head, entries ``keep`` [layers, n_keep, kv_heads] (indices into
        ``seq_slots``) and move them to the front of the sequence's slots, in the given order."""
        n_keep = keep.shape[1]
        dst = seq_slots[:n_keep]
        for pool in (self.k, self.v, *self.fields.values()):
            rows = pool[:, seq_slots]  # [L, n, kv_heads, ...]
            idx = keep.view(*keep.shape, *([1] * (rows.dim() - 3))).expand(-1, -1, -1, *rows.shape[3:])
            pool[:, dst] = rows.gather(1, idx)

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Per sequence, layer and KV head, copy the entry at slot ``src`` over slot ``dst``
        (both [B, layers, kv_heads]) in K, V and every side field."""
        b, layers, heads = dst.shape
        li = torch.arange(layers, device=dst.device).view(1, layers, 1).expand(b, layers, heads)
        hi = torch.arange(heads, device=dst.device).view(1, 1, heads).expand(b, layers, heads)
        for pool in (self.k, self.v, *self.fields.values()):
            pool[li, dst, hi] = pool[li, src, hi]

    def bytes_allocated(self) -> int:
        """Physical bytes of K/V plus side fields."""
        tensors = [self.k, self.v, *self.fields.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
