"""Paged physical K/V storage: one pool per tensor, indexed by slot = block * block_size + offset.

Storage grows lazily (to what is needed, at least a quarter more, up to the budget) so a large
budget costs memory only when used; the block manager, not this class, enforces the budget.
Slot 0's block is a scratch block that padded batch entries point to.

Memory and transfers are measured, not computed: ``memory`` counts the bytes of every tensor
the store (and the policy's device buffers) allocate on the compute device, with its peak;
``transfers`` counts the bytes of every host<->device copy actually issued (padding included).
A host-resident store (offloading policies) takes new K/V through pinned staging buffers:
the device-to-host copy is asynchronous and lands in the store at ``flush_writes``.
"""

from __future__ import annotations

import torch

from backends.kvcache.block_manager import FIRST_BLOCK
from backends.kvcache.config import ModelConfig

SCRATCH_SLOT = 0


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device's queue (a blocking copy
    from pageable memory would wait for the step in flight): pinned first on a GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class DeviceMemory:
    """Bytes held by tensors allocated through it (and transient ones reported to it), with the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def alloc(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` as held from now on; returns it."""
        self.current += t.numel() * t.element_size()
        self.peak = max(self.peak, self.current)
        return t

    def free(self, t: torch.Tensor | None) -> None:
        """``t`` is no longer held."""
        if t is not None:
            self.current -= t.numel() * t.element_size()

    def transient(self, nbytes: int) -> None:
        """``nbytes`` held briefly on top of what is held now (a step's fetched K/V)."""
        self.peak = max(self.peak, self.current + nbytes)

    def reset_peak(self) -> None:
        """Start peak tracking afresh from what is held now."""
        self.peak = self.current


class Transfers:
    """Bytes of host<->device copies issued. Copies whose size only the device knows (rows
    selected on the GPU) are summed on the device, in place into one counter (so a captured
    CUDA graph adds to it at every replay), and read when the total is asked for."""

    def __init__(self) -> None:
        self.h2d_host = 0
        self.d2h = 0
        self._h2d_device: torch.Tensor | None = None

    def track_device(self, device: torch.device) -> None:
        """Allocate the device-side counter (before any graph capture that adds to it)."""
        if self._h2d_device is None:
            self._h2d_device = torch.zeros((), dtype=torch.int64, device=device)

    def device_counter(self, device: torch.device) -> torch.Tensor:
        """The device-side host-to-device byte counter, for kernels that add to it themselves."""
        self.track_device(device)
        return self._h2d_device

    def add_h2d_device(self, nbytes: torch.Tensor) -> None:
        """Add a device-side byte count (no host sync)."""
        self.track_device(nbytes.device)
        self._h2d_device.add_(nbytes)

    @property
    def h2d(self) -> int:
        """Host-to-device bytes so far."""
        extra = int(self._h2d_device) if self._h2d_device is not None else 0
        return self.h2d_host + extra


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
        host_resident: bool = False,
    ):
        self.cfg, self.block_size, self.device, self.dtype = cfg, block_size, device, dtype
        self.pin_memory = pin_memory and device.type == "cpu" and torch.cuda.is_available()
        # K/V kept in host memory for a compute device elsewhere: writes and fetches are transfers
        self.host_resident = host_resident
        self.memory = DeviceMemory()  # compute-device bytes (the store's own only if not host-resident)
        self.transfers = Transfers()
        self._staging: tuple[torch.Tensor, torch.Tensor] | None = None  # pinned [layers, tokens, kvh, D]
        self._staged: list[tuple[int, torch.Tensor, int, int]] = []  # (layer, slots, offset, n)
        self._staged_used: list[int] = [0] * cfg.num_layers
        self._staged_event = None
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
        t = torch.zeros(size, dtype=dtype, device=self.device, pin_memory=self.pin_memory)
        return t if self.host_resident else self.memory.alloc(t)

    def add_field(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """A per-layer, per-slot side tensor kept in step with K/V (scores, positions)."""
        self._field_specs[name] = (shape, dtype)
        self.fields[name] = self._new(shape, dtype, self.capacity_blocks)

    def ensure_blocks(self, block_ids: list[int]) -> None:
        """Grow physical storage so every block in ``block_ids`` exists."""
        need = max(block_ids, default=0) + 1
        if need <= self.capacity_blocks:
            return
        blocks = min(self.max_blocks, max(need, self.capacity_blocks + self.capacity_blocks // 4))

        def grown(old: torch.Tensor, shape, dtype) -> torch.Tensor:
            new = self._new(shape, dtype, blocks)
            new[:, : old.shape[1]] = old
            if not self.host_resident:
                self.memory.free(old)
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
        return to_device_async(torch.where(valid, slot, SCRATCH_SLOT), self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v rows [N, kv_heads, head_dim] at ``slots`` [N] of ``layer`` (slots on the
        store's device). From a GPU into host memory the rows go through pinned staging."""
        if self.host_resident:
            self.transfers.d2h += k.numel() * self.k.element_size() + v.numel() * self.v.element_size()
            if k.device.type == "cuda" and self.device.type == "cpu":
                self._stage(layer, slots, k, v)
                return
        self.k[layer].index_copy_(0, slots, k.to(self.device, self.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.device, self.dtype))

    def _stage(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n, offset = k.shape[0], self._staged_used[layer]
        if self._staging is None or self._staging[0].shape[1] < offset + n:
            self.flush_writes()  # (a no-op unless the step outgrew the staging buffers)
            offset = 0
            size = max(n, 2 * (self._staging[0].shape[1] if self._staging is not None else 0))
            shape = (self.cfg.num_layers, size, *self.k.shape[2:])
            self._staging = tuple(torch.empty(shape, dtype=self.dtype, pin_memory=True) for _ in range(2))
        sk, sv = self._staging
        sk[layer, offset : offset + n].copy_(k, non_blocking=True)
        sv[layer, offset : offset + n].copy_(v, non_blocking=True)
        self._staged.append((layer, slots.to("cpu"), offset, n))
        self._staged_used[layer] = offset + n

    def has_staged_writes(self) -> bool:
        """Whether new K/V wait in pinned staging for ``flush_writes`` (a host-resident store)."""
        return bool(self._staged)

    def flush_writes(self) -> None:
        """Wait for the staged device-to-host copies and put their rows into the store."""
        if not self._staged:
            return
        torch.cuda.current_stream().synchronize()
        sk, sv = self._staging
        for layer, slots, offset, n in self._staged:
            self.k[layer].index_copy_(0, slots, sk[layer, offset : offset + n])
            self.v[layer].index_copy_(0, slots, sv[layer, offset : offset + n])
        self._staged.clear()
        self._staged_used = [0] * self.cfg.num_layers

    def preallocate_staging(self, tokens: int) -> None:
        """Pinned staging for ``tokens`` new entries per layer and step (before measuring)."""
        if self.host_resident and self.pin_memory and tokens > 0:
            shape = (self.cfg.num_layers, tokens, *self.k.shape[2:])
            self._staging = tuple(torch.empty(shape, dtype=self.dtype, pin_memory=True) for _ in range(2))

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy host rows ``t`` to ``device`` (counted as host-to-device bytes)."""
        self.transfers.h2d_host += t.numel() * t.element_size()
        return t.to(device, non_blocking=True)

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

    def used_slots(self, block_tables: list[list[int]]) -> int:
        """Slots from 0 up to the last block any of ``block_tables`` holds (a prefix to copy)."""
        last = max((max(bt) for bt in block_tables if bt), default=0)
        return (last + 1) * self.block_size
