"""The GPU engine's Triton kernels against the reference attention. On a host without a GPU
they run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are built);
on a GPU they are compiled. Inputs are fresh random data; pages are scattered."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the choice once
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from backends.kvcache.kernels import ops  # noqa: E402
from backends.kvcache.models.llama import RMSNorm, rotate_half  # noqa: E402
from backends.kvcache.policies.base import attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 16


def paged_case(heads: int, kv_heads: int, dim: int, lens: list[int], seed: int):
    """Random q, caches scattered over shuffled pages, block table and lengths."""
    gen = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // PAGE) for n in lens) + 3
    kc = torch.randn(pages * PAGE, kv_heads, dim, generator=gen)
    vc = torch.randn(pages * PAGE, kv_heads, dim, generator=gen)
    order = (torch.randperm(pages - 1, generator=gen) + 1).tolist()
    width = max(-(-n // PAGE) for n in lens) + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, n in enumerate(lens):
        k = -(-n // PAGE)
        table[b, :k] = torch.tensor(order[:k])
        order = order[k:]
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32)


def reference(q, kc, vc, table, lens, scale):
    """Gather every sequence's entries and run the reference masked attention."""
    width = int(lens.max())
    slots = (table.long().unsqueeze(-1) * PAGE + torch.arange(PAGE)).flatten(1)[:, :width]
    valid = torch.arange(width)[None] < lens.long()[:, None]
    kk, vv = kc[slots].transpose(1, 2), vc[slots].transpose(1, 2)
    out, probs = attention(q.unsqueeze(1), kk, vv, valid[:, None, None, None, :], scale, True)
    return out[:, 0], probs[:, :, :, 0], slots, valid


def to(dev, *ts):
    return [t.to(dev) for t in ts]


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 32)])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_matches_reference(heads, kv_heads, dim, splits):
    q, kc, vc, table, lens = paged_case(heads, kv_heads, dim, [1, 17, 70, 130], seed=heads + splits)
    scale = dim**-0.5
    want, probs, slots, valid = reference(q, kc, vc, table, lens, scale)
    out, lse = ops().paged_decode_attention(*to(DEVICE, q, kc, vc, table, lens), scale, PAGE, splits=splits)
    err = (out.cpu() - want).norm() / want.norm()
    assert err < 1e-3, err  # the GPU's tf32-free fp32 path; the interpreter is exact to rounding
    # log-sum-exp of the scaled scores over each sequence's entries
    kk = kc[slots].repeat_interleave(heads // kv_heads, 2)  # [B,L,H,D]
    s = torch.einsum("bhd,blhd->bhl", q, kk) * scale
    s = s.masked_fill(~valid[:, None], float("-inf"))
    assert torch.allclose(lse.cpu(), torch.logsumexp(s, -1), atol=1e-4)


# lengths: one key, part of a tile, several tiles (a split left empty); fewer tiles than a group's heads
@pytest.mark.parametrize("heads,kv_heads,dim,lens", [(8, 2, 64, [1, 40, 99, 300]), (6, 2, 32, [1, 40, 99, 300]),
                                                     (8, 1, 32, [1, 20])])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_scores_are_h2o_accumulated_attention(heads, kv_heads, dim, lens, splits):
    q, kc, vc, table, lens = paged_case(heads, kv_heads, dim, lens, seed=7 + heads)
    scale = dim**-0.5
    _, probs, slots, valid = reference(q, kc, vc, table, lens, scale)  # probs [B,KVH,G,L]
    start = torch.rand(kc.shape[0], kv_heads)  # scores accumulate on top of what is there
    want = start.clone()
    want.index_put_((slots,), (probs.sum(2).transpose(1, 2) * valid[..., None]), accumulate=True)
    args = to(DEVICE, q, kc, vc, table, lens)
    plain_out, plain_lse = ops().paged_decode_attention(*args, scale, PAGE, splits=splits)
    score = start.to(DEVICE)
    out, lse = ops().paged_decode_attention(*args, scale, PAGE, splits=splits, score=score)
    assert torch.allclose(score.cpu(), want, atol=1e-5)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)  # attention itself is unchanged


def test_rms_norm_and_rope_match_the_model_code():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 96, generator=gen), torch.randn(96, generator=gen)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = w
    assert torch.allclose(ops().rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5).cpu(), norm(x), atol=1e-5)
    qkv = torch.randn(7, 6, 32, generator=gen)
    cos, sin = torch.randn(7, 32, generator=gen), torch.randn(7, 32, generator=gen)
    view = qkv[:, 1:5]  # a strided view, as split_qkv hands it over
    want = view * cos[:, None] + rotate_half(view) * sin[:, None]
    got = ops().rope(*to(DEVICE, view, cos, sin))
    assert torch.allclose(got.cpu(), want, atol=1e-5)


def test_gather_rows_reads_only_the_selected_rows():
    src = torch.randn(40, 64).to(torch.bfloat16)
    idx = torch.tensor([7, 3, 39, 0, 12], device=DEVICE)
    ok = torch.tensor([True, True, False, True, True], device=DEVICE)
    out = torch.full((5, 64), 9.0, dtype=torch.bfloat16, device=DEVICE)
    if DEVICE == "cuda":
        src = src.pin_memory()  # read in place by the GPU
    ops().gather_rows(src, idx, ok, out)
    want = src[idx.cpu()].clone()
    want[2] = 0
    assert torch.equal(out.cpu(), want)


# bfloat16 on a GPU only: the interpreter's float32 -> bfloat16 cast does not round to nearest
@pytest.mark.parametrize("dtype", [torch.float32, *([torch.bfloat16] if DEVICE == "cuda" else [])])
def test_rerotate_rows_writes_what_the_torch_rotation_writes(dtype):
    """StreamingLLM's sink re-rotation in one launch: the keys the engine's torch expression
    (StreamingPolicy._rope) writes, bit for bit, at every layer, head and sink, and nothing else."""
    from types import SimpleNamespace

    from backends.kvcache.policies.streaming import StreamingPolicy

    gen = torch.Generator().manual_seed(5)
    layers, b, sinks, kvh, d, slots_n = 3, 2, 4, 2, 16, 40
    policy = SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    policy._angles = StreamingPolicy._angles.__get__(policy)
    raw = torch.randn(layers, b, sinks, kvh, d, generator=gen)
    slots = torch.tensor([[4, 5, 6, 7], [21, 22, 23, 24]])
    gaps = torch.tensor([7, 130])
    k = torch.randn(layers, slots_n, kvh, d, generator=gen).to(dtype)
    before, want = k.clone(), k.clone()
    want[:, slots] = StreamingPolicy._rope(policy, raw, torch.arange(sinks) + gaps[:, None]).to(dtype)
    emb = policy._angles(torch.arange(256))
    dev = [t.to(DEVICE) for t in (k, raw, slots, gaps, emb.cos(), emb.sin())]
    ops().rerotate_rows(*dev)
    assert not torch.equal(want, before)  # the slots do change
    assert torch.equal(dev[0].cpu(), want)


def test_copy_pages_copies_the_pages_each_sequence_holds():
    """The layer-ahead copy of a host store: exactly the pages a sequence's first ``lens`` entries
    occupy, at the same slots, read in place from pinned memory on a GPU."""
    page, kvh, d = 4, 2, 8
    src = torch.randn(12 * page, kvh, d).to(torch.bfloat16)
    if DEVICE == "cuda":
        src = src.pin_memory()
    dst = torch.zeros(12 * page, kvh, d, dtype=torch.bfloat16, device=DEVICE)
    table = torch.tensor([[5, 2, 9, 0], [7, 0, 0, 0]], device=DEVICE)
    lens = torch.tensor([9, 4], device=DEVICE)  # 3 pages, then 1 page
    ops().copy_pages(src, dst, table, lens, page)
    want = torch.zeros_like(dst, device="cpu")
    for blk in (5, 2, 9, 7):
        want[blk * page : (blk + 1) * page] = src[blk * page : (blk + 1) * page]
    assert torch.equal(dst.cpu(), want)


@pytest.mark.parametrize("alpha", [None, 1.5])
def test_select_rows_keeps_each_heads_best_entries_in_entry_order(alpha):
    """InfiniGen's selection kernel: the kept count (alpha's mean over heads, or the dummy count,
    within floor and cap), each head's best entries (ties to the earlier entry) in entry order,
    the attention lengths, the new entry's row and the bytes added to the counter."""
    page, kvh, width, row_bytes = 4, 2, 12, 7
    gen = torch.Generator().manual_seed(3)
    mass = (torch.randn(3, kvh, 8 * page, generator=gen) * 2).round() / 2  # halves: exact ties and alpha bounds
    mass[1, 0, :6] = 0.5  # a run of equal values across the cut
    prev = torch.tensor([30, 9, 0])
    counts = torch.tensor([[10, 2, 5], [4, 1, 3], [6, 1, 2]])  # per row (cap, floor, dummy count)
    table = torch.stack([torch.randperm(8, generator=gen) for _ in range(3)]).int()
    h2d = torch.zeros((), dtype=torch.int64, device=DEVICE)
    got = ops().select_rows(*to(DEVICE, mass), alpha, *to(DEVICE, counts, prev, table), page, width, h2d, row_bytes)
    rows, ok, seq, new = (t.cpu() for t in got)
    ok = ok.view(3, width, kvh).bool()
    rows = rows.view(3, width, kvh)
    total = 0
    for b in range(3):
        n = int(prev[b])
        if alpha is None:
            count = int(counts[b, 2])
        else:
            within = sum(int((mass[b, h, :n] >= mass[b, h, :n].max() - alpha).sum()) for h in range(kvh)) if n else 0
            count = -(-within // kvh)
        keep = min(max(min(count, int(counts[b, 0])), int(counts[b, 1])), n)
        assert int(seq[b]) == keep + 1 and int(new[b]) == b * width + keep
        assert ok[b].sum(0).tolist() == [keep] * kvh
        for h in range(kvh):
            best = sorted(range(n), key=lambda i, b=b, h=h: (-float(mass[b, h, i]), i))[:keep]
            slots = [int(table[b, i // page]) * page + i % page for i in sorted(best)]
            assert rows[b, :keep, h].tolist() == [s * kvh + h for s in slots]
        total += keep * kvh * row_bytes
    assert int(h2d) == total
