"""A2SGD's partition on a GPU in one pass over v (Triton), instead of four.

The PyTorch expression (mask, two masked sums, a mask count) reads v three times and writes two
temporaries the size of the gradient. Here each program reads its block of v once, writes its
block of the mask and its partial sums and count; a second launch of one program adds the
partials in a fixed order (deterministic: no atomics) and writes the two means.

Import this module only where Triton may be imported: on a host without a GPU it runs in Triton's
interpreter, which must be chosen (``TRITON_INTERPRET=1``) before the kernels are defined.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program of the first pass
PARTIALS_TILE = 1024  # partials added per step of the second


@triton.jit
def _partition_partials(V, THRESHOLD, MASK, SUMS, COUNTS, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    v = tl.load(V + offs, mask=inside, other=0.0).to(tl.float32)
    positive = (v >= tl.load(THRESHOLD)) & inside
    tl.store(MASK + offs, positive.to(tl.uint8), mask=inside)
    # v is 0 outside the gradient, so the negative side's sum needs no second mask
    tl.store(SUMS + 2 * pid, tl.sum(tl.where(positive, v, 0.0), axis=0))
    tl.store(SUMS + 2 * pid + 1, tl.sum(tl.where(positive, 0.0, v), axis=0))
    tl.store(COUNTS + pid, tl.sum(positive.to(tl.int32), axis=0))


@triton.jit
def _partition_means(SUMS, COUNTS, MEANS, programs, n, TILE: tl.constexpr):
    offs = tl.arange(0, TILE)
    pos = tl.zeros([TILE], dtype=tl.float32)
    neg = tl.zeros([TILE], dtype=tl.float32)
    count = tl.zeros([TILE], dtype=tl.int64)
    for start in range(0, programs, TILE):
        ok = start + offs < programs
        pos += tl.load(SUMS + 2 * (start + offs), mask=ok, other=0.0)
        neg += tl.load(SUMS + 2 * (start + offs) + 1, mask=ok, other=0.0)
        count += tl.load(COUNTS + start + offs, mask=ok, other=0).to(tl.int64)
    count_pos = tl.sum(count, axis=0)
    # an empty side's mean is its (zero) sum: the count is clamped to 1, as the PyTorch path does
    tl.store(MEANS, tl.sum(pos, axis=0) / tl.maximum(count_pos, 1).to(tl.float32))
    tl.store(MEANS + 1, tl.sum(neg, axis=0) / tl.maximum(n - count_pos, 1).to(tl.float32))


def partition_means(flat: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask v >= threshold, [mean of v on the mask, mean off it]) for a contiguous 1-D v."""
    n = flat.numel()
    programs = triton.cdiv(n, BLOCK)
    positive = torch.empty(n, dtype=torch.bool, device=flat.device)
    sums = torch.empty(programs, 2, dtype=torch.float32, device=flat.device)
    counts = torch.empty(programs, dtype=torch.int32, device=flat.device)
    means = torch.empty(2, dtype=torch.float32, device=flat.device)
    threshold = threshold.to(device=flat.device, dtype=torch.float32).reshape(1)
    _partition_partials[(programs,)](flat, threshold, positive.view(torch.uint8), sums, counts, n,
                                     BLOCK=BLOCK, num_warps=8)
    _partition_means[(1,)](sums, counts, means, programs, n, TILE=PARTIALS_TILE, num_warps=4)
    return positive, means
