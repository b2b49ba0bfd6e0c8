"""Triton kernels of the GPU engine: paged decode attention (reads the block table directly,
GQA-aware, split over the sequence for small batches; optionally heavy-hitter column scores in
the same pass, no extra launch), RMSNorm and RoPE in one launch each, and the host-store
kernels of the offloading policies (rows and pages read and written in pinned memory in place;
InfiniGen's speculation, selection and new entry).

Import this module only through ``backends.kvcache.kernels``: on a host without a GPU the
kernels run in Triton's interpreter, which must be chosen (``TRITON_INTERPRET=1``) before the
kernels are defined.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PAGE_TOKENS_PER_TILE = 64  # keys per inner-loop tile (4 pages of 16)
MIN_QUERY_ROWS = 16  # tl.dot needs at least 16 rows: a KV head's query group is padded to this


@triton.jit
def _paged_decode(
    Q, K, V, BT, LENS, OUT, LSE, S,
    scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_sb, stride_sh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, WRITE_S: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(LENS + b)
    per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(start + per, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g
    row_ok = g < G
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < end
        blk = tl.load(BT + b * stride_bt + offs // PAGE, mask=ok, other=0)
        slot = blk.to(tl.int64) * PAGE + offs % PAGE
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if WRITE_S:  # kept for the merge, which turns them into probabilities once the lse is known
            s_ptr = S + b * stride_sb + heads[:, None] * stride_sh + offs[None, :]
            tl.store(s_ptr, s, mask=row_ok[:, None] & ok[None, :])
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    safe = tl.where(denom > 0, denom, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
    o_ptr = OUT + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + heads * stride_lh + sp, lse, mask=row_ok)


@triton.jit
def _split_weights(LSEP, b, h, stride_lb, stride_lh, SPLITS: tl.constexpr):
    lse = tl.load(LSEP + b * stride_lb + h * stride_lh + tl.arange(0, SPLITS))
    top = tl.max(lse, 0)
    return tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0), top


@triton.jit
def _merge_head(
    OP, LSEP, OUT, LSE, b, h, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    w, top = _split_weights(LSEP, b, h, stride_lb, stride_lh, SPLITS)
    parts = tl.load(OP + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / total
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))
    tl.store(LSE + b * H + h, top + tl.log(total))


@triton.jit
def _combine_splits(
    OP, LSEP, OUT, LSE, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):
    _merge_head(OP, LSEP, OUT, LSE, tl.program_id(0), tl.program_id(1), stride_pb, stride_ph, stride_ps,
                stride_lb, stride_lh, stride_ob, stride_oh, H, D, SPLITS)


@triton.jit
def _combine_and_score(
    OP, LSEP, OUT, LSE, S, BT, LENS, SCORE,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_sb, stride_sh,
    stride_bt, stride_ss,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, G_ROWS: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program (b, kvh, c) merges head c of the group (c < G) and scores the c-th tile of keys:
    # a tile's slots belong to it alone (no atomics), and a long sequence's tiles run in parallel
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    c = tl.program_id(2)
    if SPLITS > 1:
        if c < G:
            _merge_head(OP, LSEP, OUT, LSE, b, kvh * G + c, stride_pb, stride_ph, stride_ps,
                        stride_lb, stride_lh, stride_ob, stride_oh, H, D, SPLITS)
    length = tl.load(LENS + b)
    if c * BLOCK_N < length:
        g = tl.arange(0, G_ROWS)
        heads = kvh * G + g
        row_ok = g < G
        if SPLITS > 1:  # each tile's program merges the group's log-sum-exps itself (a few loads)
            lse = tl.full([G_ROWS], float("inf"), tl.float32)  # padded rows: exp(-inf - inf) = 0
            for i in tl.static_range(G):
                w, top = _split_weights(LSEP, b, kvh * G + i, stride_lb, stride_lh, SPLITS)
                lse = tl.where(g == i, top + tl.log(tl.sum(w, 0)), lse)
        else:  # the split kernel wrote the log-sum-exp (a previous launch: visible here)
            lse = tl.load(LSE + b * H + heads, mask=row_ok, other=float("inf"))
        offs = c * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < length
        s_ptr = S + b * stride_sb + heads[:, None] * stride_sh + offs[None, :]
        s = tl.load(s_ptr, mask=row_ok[:, None] & ok[None, :], other=float("-inf"))
        col = tl.sum(tl.exp(s - lse[:, None]), 0)
        blk = tl.load(BT + b * stride_bt + offs // PAGE, mask=ok, other=0)
        slot = blk.to(tl.int64) * PAGE + offs % PAGE
        ptr = SCORE + slot * stride_ss + kvh
        tl.store(ptr, tl.load(ptr, mask=ok, other=0.0) + col, mask=ok)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Sequence splits per (sequence, KV head) so a small batch still fills the GPU."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: splitting only adds work
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while batch * kv_heads * splits < 2 * sms and splits < 16:
        splits *= 2
    return splits


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, page: int, splits: int | None = None, score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence. q [B,H,D]; caches [slots,KVH,D]; block_table [B,W] int32;
    seq_lens [B] int32 (>= 1). Returns out [B,H,D] and the log-sum-exp [B,H] (float32). With
    ``score`` [slots, KVH] float32, the same pass also adds to score[slot, kv_head] the attention
    probability each cached key got, summed over the query heads of its group (H2O's scores)."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    g_pad = max(MIN_QUERY_ROWS, triton.next_power_of_2(group))
    splits = splits or num_splits(b, kvh, q.device)
    lse = torch.empty(b, h, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    if splits == 1:
        o_part, lse_part = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        o_part = torch.empty(b, h, splits, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(b, h, splits, device=q.device, dtype=torch.float32)
    # the scaled logits of every key, for the scores; without scores nothing is written there
    logits = lse_part if score is None else torch.empty(
        b, h, block_table.shape[1] * page, device=q.device, dtype=torch.float32)
    _paged_decode[(b, kvh, splits)](
        q, k_cache, v_cache, block_table, seq_lens, o_part, lse_part, logits,
        scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        logits.stride(0), logits.stride(1),
        G=group, G_PAD=g_pad, D=d, PAGE=page, BLOCK_N=PAGE_TOKENS_PER_TILE, SPLITS=splits,
        PRECISION=_precision(q.dtype), WRITE_S=score is not None, num_warps=4,
    )
    if score is not None:
        tiles = triton.cdiv(block_table.shape[1] * page, PAGE_TOKENS_PER_TILE)
        _combine_and_score[(b, kvh, max(tiles, group) if splits > 1 else tiles)](
            o_part, lse_part, out, lse, logits, block_table, seq_lens, score,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), logits.stride(0), logits.stride(1), block_table.stride(0),
            score.stride(0),
            H=h, D=d, SPLITS=splits, G=group, G_ROWS=triton.next_power_of_2(group), PAGE=page,
            BLOCK_N=PAGE_TOKENS_PER_TILE, num_warps=4,
        )
    elif splits > 1:
        _combine_splits[(b, h)](
            o_part, lse_part, out, lse, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), H=h, D=d, SPLITS=splits,
        )
    return out, lse


@triton.jit
def _rms_norm(X, W, Y, stride_x, stride_y, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    y = (x * r).to(Y.dtype.element_ty).to(tl.float32)  # rounded to the model dtype, then scaled
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * y).to(Y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension in one launch (float32 statistics, as the reference)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = torch.empty_like(x2)
    n = shape[-1]
    _rms_norm[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, eps,
                              BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4)
    return y.view(shape)


@triton.jit
def _rope(X, COS, SIN, Y, stride_xn, stride_xh, stride_yn, stride_yh, stride_cn, HALF: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    x1 = tl.load(X + n * stride_xn + h * stride_xh + i).to(tl.float32)
    x2 = tl.load(X + n * stride_xn + h * stride_xh + HALF + i).to(tl.float32)
    c1 = tl.load(COS + n * stride_cn + i).to(tl.float32)
    c2 = tl.load(COS + n * stride_cn + HALF + i).to(tl.float32)
    s1 = tl.load(SIN + n * stride_cn + i).to(tl.float32)
    s2 = tl.load(SIN + n * stride_cn + HALF + i).to(tl.float32)
    ty = Y.dtype.element_ty
    # rounded after each product, as x * cos + rotate_half(x) * sin rounds in the model dtype
    y1 = (x1 * c1).to(ty).to(tl.float32) + (-(x2 * s1)).to(ty).to(tl.float32)
    y2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    tl.store(Y + n * stride_yn + h * stride_yh + i, y1.to(ty))
    tl.store(Y + n * stride_yn + h * stride_yh + HALF + i, y2.to(ty))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [N, heads, D] (any strides in N and heads) with cos/sin [N, D]."""
    n, heads, d = x.shape
    y = torch.empty(n, heads, d, device=x.device, dtype=x.dtype)
    _rope[(n, heads)](x, cos, sin, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0),
                      HALF=d // 2, num_warps=1)
    return y



@triton.jit
def _rerotate_rows(
    RAW, GAPS, COS, SIN, SLOTS, K,
    stride_rl, stride_rb, stride_rs, stride_rh, stride_tp, stride_sb, stride_kl, stride_ks, stride_kh,
    KVH: tl.constexpr, HALF: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.program_id(1)
    layer = (tl.program_id(2) // KVH).to(tl.int64)
    h = tl.program_id(2) % KVH
    pos = i + tl.load(GAPS + b)
    slot = tl.load(SLOTS + b * stride_sb + i).to(tl.int64)
    j = tl.arange(0, HALF)
    src = RAW + layer * stride_rl + b * stride_rb + i * stride_rs + h * stride_rh
    x1 = tl.load(src + j)
    x2 = tl.load(src + HALF + j)
    c1 = tl.load(COS + pos * stride_tp + j)
    c2 = tl.load(COS + pos * stride_tp + HALF + j)
    s1 = tl.load(SIN + pos * stride_tp + j)
    s2 = tl.load(SIN + pos * stride_tp + HALF + j)
    dst = K + layer * stride_kl + slot * stride_ks + h * stride_kh
    ty = K.dtype.element_ty
    tl.store(dst + j, (x1 * c1 + (-x2) * s1).to(ty))
    tl.store(dst + HALF + j, (x2 * c2 + x1 * s2).to(ty))


def rerotate_rows(k: torch.Tensor, raw: torch.Tensor, slots: torch.Tensor, gaps: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> None:
    """StreamingLLM's sink re-rotation in one launch: k[layer, slots[b, i]] = RoPE(raw[layer, b,
    i]) at position i + gaps[b], with cos/sin rows [positions, D] (float32) of the model's angles.
    k [L, slots, KVH, D]; raw [L, B, sinks, KVH, D] float32 (keys before RoPE). Products and sums
    round one by one (no fused multiply-add), as the torch expression does."""
    layers, b, sinks, kvh, d = raw.shape
    _rerotate_rows[(b, sinks, layers * kvh)](
        raw, gaps, cos, sin, slots, k,
        raw.stride(0), raw.stride(1), raw.stride(2), raw.stride(3), cos.stride(0), slots.stride(0),
        k.stride(0), k.stride(1), k.stride(2),
        KVH=kvh, HALF=d // 2, num_warps=1, enable_fp_fusion=False,
    )

@triton.jit
def _drop_one(
    BT, LENS, DROP, FIRST_RECENT, K, V, SCORE, POS, sink,
    stride_bt, stride_kl, stride_ks, stride_kh, stride_fl, stride_fs,
    KVH: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BY_SCORE: tl.constexpr,
):
    b = tl.program_id(0)
    layer = (tl.program_id(1) // KVH).to(tl.int64)  # layer offsets pass 2^31 elements on large models
    h = tl.program_id(1) % KVH
    if tl.load(DROP + b) != 0:
        length = tl.load(LENS + b)
        first_recent = tl.load(FIRST_RECENT + b)
        best = float("inf")
        best_idx = length - 1  # nothing evictable: the last entry "moves" onto itself
        for n0 in range(0, length, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            ok = offs < length
            blk = tl.load(BT + b * stride_bt + offs // PAGE, mask=ok, other=0)
            slot = blk.to(tl.int64) * PAGE + offs % PAGE
            field = layer * stride_fl + slot * stride_fs + h
            pos = tl.load(POS + field, mask=ok, other=0)
            if BY_SCORE:
                val = tl.load(SCORE + field, mask=ok, other=0.0)
            else:
                val = pos.to(tl.float32)
            key = tl.where(ok & (pos < first_recent) & (pos >= sink), val, float("inf"))
            low = tl.min(key, 0)
            idx = n0 + tl.argmin(key, 0)
            better = low < best
            best_idx = tl.where(better, idx, best_idx)
            best = tl.where(better, low, best)
        last = length - 1
        src = tl.load(BT + b * stride_bt + last // PAGE).to(tl.int64) * PAGE + last % PAGE
        dst = tl.load(BT + b * stride_bt + best_idx // PAGE).to(tl.int64) * PAGE + best_idx % PAGE
        d = tl.arange(0, D)
        base = layer * stride_kl + h * stride_kh + d
        tl.store(K + base + dst * stride_ks, tl.load(K + base + src * stride_ks))
        tl.store(V + base + dst * stride_ks, tl.load(V + base + src * stride_ks))
        fsrc = layer * stride_fl + src * stride_fs + h
        fdst = layer * stride_fl + dst * stride_fs + h
        tl.store(POS + fdst, tl.load(POS + fsrc))
        if BY_SCORE:
            tl.store(SCORE + fdst, tl.load(SCORE + fsrc))


def drop_one_in_place(
    k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor | None, block_table: torch.Tensor,
    lens: torch.Tensor, drop: torch.Tensor, first_recent: torch.Tensor, sink: int, page: int,
) -> None:
    """For each sequence b with drop[b] != 0 and each layer and KV head: the entry with the
    lowest key (score, or position when ``score`` is None) among those at positions in
    [sink, first_recent[b]) is overwritten by the sequence's last entry (index lens[b] - 1).
    k, v [L, slots, KVH, D]; pos, score [L, slots, KVH]."""
    layers, _, kvh, d = k.shape
    by_score = score is not None
    _drop_one[(lens.shape[0], layers * kvh)](
        block_table, lens, drop, first_recent, k, v, score if by_score else pos, pos, sink,
        block_table.stride(0), k.stride(0), k.stride(1), k.stride(2), pos.stride(0), pos.stride(1),
        KVH=kvh, D=d, PAGE=page, BLOCK_N=PAGE_TOKENS_PER_TILE, BY_SCORE=by_score, num_warps=1,
    )


@triton.jit
def _gather_rows(SRC, IDX, OK, DST, n, D: tl.constexpr, ROWS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    inside = r < n
    take = inside & (tl.load(OK + r, mask=inside, other=0) != 0)
    row = tl.load(IDX + r, mask=take, other=0).to(tl.int64)
    d = tl.arange(0, D)
    vals = tl.load(SRC + row[:, None] * D + d[None, :], mask=take[:, None], other=0.0)
    tl.store(DST + r[:, None].to(tl.int64) * D + d[None, :], vals, mask=inside[:, None])


def gather_rows(src: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src[idx[i]] where ok[i], else 0. src [R, D] contiguous, may be pinned host
    memory read in place by the GPU (mapped: no staging copy, no host sync); idx, ok [N] on
    the device; out [N, D] on the device. Only rows with ok are read."""
    n, d = idx.numel(), src.shape[1]
    rows = 16
    _gather_rows[(triton.cdiv(n, rows),)](src, idx, ok, out, n, D=d, ROWS=rows, num_warps=4)
    return out


@triton.jit
def _scatter_rows(DST, IDX, SRC, n, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if r < n:
        row = tl.load(IDX + r).to(tl.int64)
        c = tl.arange(0, BLOCK)
        ok = c < WIDTH
        tl.store(DST + row * WIDTH + c, tl.load(SRC + r.to(tl.int64) * WIDTH + c, mask=ok), mask=ok)


def scatter_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """dst[idx[i]] = src[i]. dst [R, ...] contiguous, may be pinned host memory written in place
    by the GPU (mapped: no staging copy, and a CUDA graph can hold it); idx [N] and src [N, ...]
    on the device, src contiguous with dst's row shape."""
    n = idx.numel()
    width = dst[0].numel()
    _scatter_rows[(n,)](dst, idx, src, n, WIDTH=width, BLOCK=triton.next_power_of_2(width), num_warps=4)


@triton.jit
def _copy_pages(SRC, DST, BT, LENS, stride_bt, PAGE: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    if j * PAGE < tl.load(LENS + b):
        base = tl.load(BT + b * stride_bt + j).to(tl.int64) * PAGE * WIDTH
        offs = tl.arange(0, BLOCK)
        for start in range(0, PAGE * WIDTH, BLOCK):
            ok = start + offs < PAGE * WIDTH
            tl.store(DST + base + start + offs, tl.load(SRC + base + start + offs, mask=ok), mask=ok)


def copy_pages(src: torch.Tensor, dst: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               page: int) -> None:
    """Copy every page a sequence's first ``seq_lens[b]`` entries occupy (per its block table
    [B, W]) from ``src`` to ``dst``, both [slots, ...] contiguous with the same layout; src may
    be pinned host memory read in place (a layer-ahead fetch that a CUDA graph can hold, sized
    by the device-side lengths)."""
    width = src[0].numel()
    block = min(triton.next_power_of_2(page * width), 4096)
    _copy_pages[(block_table.shape[0], block_table.shape[1])](
        src, dst, block_table, seq_lens, block_table.stride(0), PAGE=page, WIDTH=width, BLOCK=block, num_warps=4,
    )


# --- InfiniGen's decode: speculation, selection and the new entry, one launch each -------------


@triton.jit
def _partial_scores(qs, PART, BT, b, kh, n, valid, stride_bt, stride_ps, scale,
                    R: tl.constexpr, R_PAD: tl.constexpr, PAGE: tl.constexpr):
    """Speculated scores [G_PAD, BLOCK_N] of the entries ``n`` (-inf where not ``valid``)."""
    blk = tl.load(BT + b * stride_bt + n // PAGE, mask=valid, other=0)
    slot = blk.to(tl.int64) * PAGE + n % PAGE
    r = tl.arange(0, R_PAD)
    keys = tl.load(PART + slot[:, None] * stride_ps + kh * R + r[None, :], mask=valid[:, None] & (r < R)[None, :],
                   other=0.0).to(tl.float32)
    s = tl.sum(qs[:, None, :] * keys[None, :, :], axis=2) * scale
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _spec_scores(
    Q, COS, SIN, SEL, PART, BT, PREV, S, M, Z,
    scale, stride_q, stride_cs, stride_sb, stride_sk, stride_sd, stride_ps, stride_bt, stride_s0, stride_s1,
    stride_s2, stride_m0, stride_m1, stride_m2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, ROPE: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    n_prev = tl.load(PREV + b)
    per = tl.cdiv(tl.cdiv(n_prev, SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(start + per, n_prev)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    r = tl.arange(0, R_PAD)
    gm = g < G
    qrow = Q + b * stride_q + (kh * G + g)[:, None] * D
    q = tl.load(qrow + d[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
    if ROPE:  # x * cos + rotate_half(x) * sin, at the new token's position
        q2 = tl.load(qrow + ((d + D // 2) % D)[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(COS + b * stride_cs + d)
        sin = tl.load(SIN + b * stride_cs + d)
        q = q * cos[None, :] + (sign[None, :] * q2) * sin[None, :]
    sel = tl.load(SEL + b * stride_sb + kh * stride_sk + d[:, None] * stride_sd + r[None, :],
                  mask=(r < R)[None, :], other=0.0)
    qs = tl.sum(q[:, :, None] * sel[None, :, :], axis=1)  # [G_PAD, R_PAD]: the skewed partial query
    offs = tl.arange(0, BLOCK_N)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    z = tl.zeros([G_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):  # this split's scores, and each head's softmax sums over them
        n = n0 + offs
        valid = n < end
        blk = tl.load(BT + b * stride_bt + n // PAGE, mask=valid, other=0)
        slot = blk.to(tl.int64) * PAGE + n % PAGE
        keys = tl.load(PART + slot[:, None] * stride_ps + kh * R + r[None, :],
                       mask=valid[:, None] & (r < R)[None, :], other=0.0).to(tl.float32)
        sc = tl.sum(qs[:, None, :] * keys[None, :, :], axis=2) * scale
        sc = tl.where(valid[None, :], sc, float("-inf"))
        tl.store(S + b * stride_s0 + kh * stride_s1 + g[:, None] * stride_s2 + n[None, :], sc,
                 mask=gm[:, None] & valid[None, :])
        m_new = tl.maximum(m, tl.max(sc, 1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), 1)
        m = m_new
    part = b * stride_m0 + kh * stride_m1 + sp * stride_m2 + g
    tl.store(M + part, m, mask=gm)
    tl.store(Z + part, z, mask=gm)


@triton.jit
def _spec_mass(
    S, M, Z, PREV, MASS,
    stride_s0, stride_s1, stride_s2, stride_m0, stride_m1, stride_m2, stride_mb, stride_mk,
    G: tl.constexpr, G_PAD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_prev = tl.load(PREV + b)
    if tl.program_id(2) * BLOCK_N < n_prev:
        g = tl.arange(0, G_PAD)
        gm = g < G
        sp = tl.arange(0, SPLITS)
        part = b * stride_m0 + kh * stride_m1 + sp[:, None] * stride_m2 + g[None, :]
        mp = tl.load(M + part, mask=gm[None, :], other=float("-inf"))  # [SPLITS, G_PAD]
        zp = tl.load(Z + part, mask=gm[None, :], other=0.0)
        m = tl.max(mp, 0)
        m = tl.where(m > float("-inf"), m, 0.0)
        z = tl.sum(zp * tl.exp(mp - m[None, :]), 0)
        z = tl.where(z > 0, z, 1.0)
        valid = n < n_prev
        sc = tl.load(S + b * stride_s0 + kh * stride_s1 + g[:, None] * stride_s2 + n[None, :],
                     mask=gm[:, None] & valid[None, :], other=float("-inf"))
        # the query group's summed probabilities, in log space (-inf where none)
        total = tl.sum(tl.where(gm[:, None], tl.exp(sc - m[:, None]) / z[:, None], 0.0), 0)
        mass = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        tl.store(MASS + b * stride_mb + kh * stride_mk + n, mass, mask=valid)


def speculate(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, sel: torch.Tensor,
              partial: torch.Tensor, block_table: torch.Tensor, prev: torch.Tensor, scale: float,
              page: int) -> torch.Tensor:
    """InfiniGen's speculation for one layer (two launches, split over the entries so a small
    batch fills the GPU). q [B, H*D] (the layer's query projection, before RoPE); cos/sin [B, D]
    float32 at each row's position (None: no RoPE); sel [B, KVH, D, r] float32 (the skew's
    partial columns); partial [slots, KVH*r] (partial keys); block_table [B, W] int32; prev [B]
    (entries stored before the step). Returns the log of the attention mass each KV head's
    query group gives each entry, [B, KVH, W*page] float32, defined below prev[b] only."""
    b, kvh, d, r = sel.shape
    group = q.shape[1] // (kvh * d)
    g_pad = triton.next_power_of_2(group)
    length = block_table.shape[1] * page
    block = 32
    splits = num_splits(b, kvh, q.device)
    scores = torch.empty(b, kvh, g_pad, length, device=q.device, dtype=torch.float32)
    m = torch.empty(b, kvh, splits, g_pad, device=q.device, dtype=torch.float32)
    z = torch.empty_like(m)
    mass = torch.empty(b, kvh, length, device=q.device, dtype=torch.float32)
    rope = cos is not None
    cos = cos if rope else sel
    sin = sin if rope else sel
    _spec_scores[(b, kvh, splits)](
        q, cos, sin, sel, partial, block_table, prev, scores, m, z,
        scale, q.stride(0), cos.stride(0), sel.stride(0), sel.stride(1), sel.stride(2), partial.stride(0),
        block_table.stride(0), scores.stride(0), scores.stride(1), scores.stride(2), m.stride(0), m.stride(1),
        m.stride(2),
        G=group, G_PAD=g_pad, D=d, R=r, R_PAD=triton.next_power_of_2(r), PAGE=page, BLOCK_N=block,
        SPLITS=splits, ROPE=rope, num_warps=4,
    )
    _spec_mass[(b, kvh, triton.cdiv(length, block))](
        scores, m, z, prev, mass,
        scores.stride(0), scores.stride(1), scores.stride(2), m.stride(0), m.stride(1), m.stride(2),
        mass.stride(0), mass.stride(1),
        G=group, G_PAD=g_pad, SPLITS=splits, BLOCK_N=block, num_warps=4,
    )
    return mass


@triton.jit
def _select_rows(
    MASS, COUNTS, PREV, BT, ROWS, OK, SEQ, NEW, H2D,
    alpha, stride_mb, stride_mk, stride_bt, stride_cb, row_bytes,
    KVH: tl.constexpr, PAGE: tl.constexpr, L_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    DUMMY: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    n_prev = tl.load(PREV + b)
    n = tl.arange(0, L_PAD)
    if DUMMY:
        count = tl.load(COUNTS + b * stride_cb + 2)
    else:  # the mean over the KV heads of the entries within alpha of each head's best, rounded up
        within = tl.zeros([], tl.int32)
        for h in range(KVH):
            xh = tl.load(MASS + b * stride_mb + h * stride_mk + n, mask=n < n_prev, other=float("-inf"))
            best = tl.max(xh, 0)
            within += tl.sum(((xh >= best - alpha) & (n < n_prev)).to(tl.int32), 0)
        count = tl.ceil(within.to(tl.float32) / KVH).to(tl.int64)
    cap = tl.load(COUNTS + b * stride_cb)
    floor = tl.load(COUNTS + b * stride_cb + 1)
    keep = tl.minimum(tl.maximum(tl.minimum(count, cap), floor), n_prev)
    # the keep best entries without a sort: the keep-th largest value by bisection over the
    # float's order-preserving integer key, ties taken in entry order
    x = tl.load(MASS + b * stride_mb + kh * stride_mk + n, mask=n < n_prev, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = tl.where(n < n_prev, key, -(2**31) - 1)  # below every float's key: never taken
    lo = tl.full([], -(2**31), tl.int64)
    hi = tl.full([], 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo
    ties = (key == lo).to(tl.int32)
    take = above | ((ties != 0) & (tl.cumsum(ties, 0) <= keep - tl.sum(above.to(tl.int32), 0)))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1  # entry order, as the reference path's sort
    blk = tl.load(BT + b * stride_bt + n // PAGE, mask=take, other=0)
    row = (blk.to(tl.int64) * PAGE + n % PAGE) * KVH + kh
    out = (b * W + pos).to(tl.int64) * KVH + kh
    tl.store(ROWS + out, row, mask=take)
    j = tl.arange(0, W_PAD)
    tl.store(OK + (b * W + j).to(tl.int64) * KVH + kh, (j < keep).to(tl.int8), mask=j < W)
    tl.atomic_add(H2D, keep * row_bytes)
    if kh == 0:
        tl.store(SEQ + b, (keep + 1).to(tl.int32))
        tl.store(NEW + b, b * W + keep)


def select_rows(mass: torch.Tensor, alpha: float | None, counts: torch.Tensor, prev: torch.Tensor,
                block_table: torch.Tensor, page: int, width: int, h2d: torch.Tensor, row_bytes: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfiniGen's selection in one launch, over ``mass`` [B, KVH, L] (defined below prev[b]):
    per row b the kept count (the mean over KV heads of the entries within ``alpha`` of the
    head's best, rounded up, or with ``alpha`` None the dummy count ``counts[b, 2]``; then
    between the floor ``counts[b, 1]`` and the cap ``counts[b, 0]``, at most ``prev[b]``), and
    per KV head its best-massed entries in entry order. Returns the store rows (slot * KVH + head) and a
    read flag, both [B * width * KVH] in the order of a gathered [B * width, KVH, D] buffer, the
    attention lengths (kept + 1, int32) and the new entry's row in that buffer, [B] each. Adds
    the kept rows' bytes (``row_bytes`` per head) to ``h2d``."""
    b, kvh, length = mass.shape
    rows = torch.empty(b * width * kvh, device=mass.device, dtype=torch.int64)
    ok = torch.empty(b * width * kvh, device=mass.device, dtype=torch.int8)
    seq = torch.empty(b, device=mass.device, dtype=torch.int32)
    new = torch.empty(b, device=mass.device, dtype=torch.int64)
    _select_rows[(b, kvh)](
        mass, counts, prev, block_table, rows, ok, seq, new, h2d,
        0.0 if alpha is None else alpha, mass.stride(0), mass.stride(1), block_table.stride(0), counts.stride(0),
        row_bytes,
        KVH=kvh, PAGE=page, L_PAD=triton.next_power_of_2(length), W=width, W_PAD=triton.next_power_of_2(width),
        DUMMY=alpha is None, num_warps=4,
    )
    return rows, ok, seq, new


@triton.jit
def _store_entry(
    K, V, SLOTS, SK, SV, SEL, PART,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_ss, stride_sh, stride_sb, stride_sk, stride_sd, stride_ps,
    D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, PARTIAL: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    slot = tl.load(SLOTS + b).to(tl.int64)
    d = tl.arange(0, D)
    k = tl.load(K + b * stride_kb + kh * stride_kh + d)
    tl.store(SK + slot * stride_ss + kh * stride_sh + d, k.to(SK.dtype.element_ty))
    tl.store(SV + slot * stride_ss + kh * stride_sh + d,
             tl.load(V + b * stride_vb + kh * stride_vh + d).to(SV.dtype.element_ty))
    if PARTIAL:
        r = tl.arange(0, R_PAD)
        sel = tl.load(SEL + b * stride_sb + kh * stride_sk + d[:, None] * stride_sd + r[None, :],
                      mask=(r < R)[None, :], other=0.0)
        pk = tl.sum(k.to(tl.float32)[:, None] * sel, 0)
        tl.store(PART + slot * stride_ps + kh * R + r, pk.to(PART.dtype.element_ty), mask=r < R)


def store_entry(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_store: torch.Tensor,
                v_store: torch.Tensor, sel: torch.Tensor | None = None, partial: torch.Tensor | None = None) -> None:
    """Each row's new entry in one launch: k, v [B, KVH, D] into k_store, v_store [slots, KVH, D]
    (may be pinned host memory written in place) at ``slots`` [B], and with ``sel`` [B, KVH, D, r]
    float32 its partial key (k's skewed columns) into ``partial`` [slots, KVH*r]."""
    b, kvh, d = k.shape
    r = 1 if sel is None else sel.shape[-1]
    sel_ = k if sel is None else sel
    part = k_store if partial is None else partial
    _store_entry[(b, kvh)](
        k, v, slots, k_store, v_store, sel_, part,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_store.stride(0), k_store.stride(1),
        sel_.stride(0), sel_.stride(1), sel_.stride(2) if sel is not None else 0, part.stride(0),
        D=d, R=r, R_PAD=triton.next_power_of_2(r), PARTIAL=sel is not None, num_warps=1,
    )
