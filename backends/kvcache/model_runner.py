"""Turns a scheduled step into one model forward: builds the per-step tensors, runs the model
with the cache policy as its attention, and picks the next token of every sequence.

Decoding sequences and newly admitted prompts share the forward (their tokens are flattened
to [1, N]), so admitting a request costs its prompt's compute, not a separate pass over the
weights. Each prompt attends only to itself (variable length, no padding).

Two paths, one set of semantics:
- reference (``torch``, CPU and CI): decode gathers each sequence's cached K/V by slot and
  runs masked attention;
- paged (``triton``, GPU): decode reads the block table in a Triton kernel, its metadata lives
  in persistent device buffers, and a pure-decode step replays a CUDA graph captured for its
  batch-size bucket (every policy; infinigen's and offload's kernels read and write the pinned
  host store in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.kvcache.decode_buffers import DecodeBuffers, DecodeGraphs
from backends.kvcache.kv_store import PagedKVStore, to_device_async
from backends.kvcache.policies.base import BatchMeta, CachePolicy, StepBatch
from backends.kvcache.sampling import sample
from backends.kvcache.sequence import Sequence


@dataclass
class LaunchedStep:
    """A greedy step whose tokens are not read back yet."""

    tokens: torch.Tensor  # [N] on the device: feeds the next step
    host: torch.Tensor  # [N] where the tokens land on the host
    done: torch.cuda.Event | None  # recorded after the copy to ``host`` (None: already there)


class ModelRunner:
    """One forward per step for all scheduled sequences."""

    def __init__(
        self, model: torch.nn.Module, policy: CachePolicy, store: PagedKVStore, device: torch.device,
        backend: str = "torch", cuda_graphs: bool = False, max_batch: int = 1, max_model_len: int = 1,
    ):
        self.model, self.policy, self.store, self.device = model, policy, store, device
        self.max_model_len = max_model_len
        self.step: StepBatch | None = None
        self.last_activation_bytes = 0
        self.paged = backend == "triton" and policy.uses_paged_decode()
        self.buffers = (
            DecodeBuffers(max_batch, -(-max_model_len // store.block_size), store.block_size, device)
            if self.paged else None
        )
        self.graphs = (
            DecodeGraphs(max_batch, lambda: (self.store.k.data_ptr(), *policy.graph_addresses()))
            if self.paged and policy.capturable() and cuda_graphs and device.type == "cuda" else None
        )
        # eviction policies drop their one-entry excess inside the graph (no per-step Python work)
        self.drop_rule = policy.drop_rule() if self.paged else None
        self.dropped: list[Sequence] = []  # sequences whose step already dropped one entry
        # pinned read-back buffers and their copies' events, used in turn (one step in flight
        # while the one before is read)
        self._host_tokens: list[torch.Tensor | None] = [None, None]
        self._readback_done = [torch.cuda.Event() for _ in range(2)] if device.type == "cuda" else []
        self._readback = 0

    def attend(self, layer, q, k, v, x, k_raw):
        """AttentionContext for the model: delegate to the cache policy."""
        return self.policy.attend(layer, q, k, v, x, k_raw, self.step)

    def _prefill_meta(self, seq: Sequence) -> BatchMeta:
        n = seq.num_tokens
        return BatchMeta(
            is_prefill=True,
            seqs=[seq],
            positions=torch.arange(n, device=self.device).unsqueeze(0),
            write_slots=self.store.slots([seq.block_table], [self.policy.prefill_stored(n)])[0],
        )

    def _decode_meta(self, seqs: list[Sequence], drops: bool) -> BatchMeta:
        if self.buffers is not None:
            before = self.buffers.fill(seqs, len(seqs), *(self._drops(seqs) if drops else (None, None)))
            return self.buffers.meta(len(seqs), seqs, before)
        dev = self.device
        b = len(seqs)
        before = tuple(s.num_stored for s in seqs)
        prev = torch.as_tensor(before)
        slot_idx = self.store.slots([s.block_table for s in seqs], [n + 1 for n in before])
        width = slot_idx.shape[1]
        kv_valid = torch.arange(width).unsqueeze(0) <= prev.unsqueeze(1)
        return BatchMeta(
            is_prefill=False,
            seqs=seqs,
            positions=to_device_async(torch.as_tensor([[s.num_seen] for s in seqs]), dev),
            write_slots=slot_idx[torch.arange(b), prev.to(slot_idx.device)],
            slot_idx=slot_idx,
            kv_valid=to_device_async(kv_valid, dev),
            prev_len=to_device_async(prev, dev),
            stored_before=before,
        )

    def _graph_forward(self, rows: int):
        """The decode forward a graph captures: model, logits and greedy argmax over ``rows``."""
        buf = self.buffers
        meta = buf.meta(rows, [], ())
        self.step = StepBatch(decode=meta, prefill=[], num_decode=rows)
        hidden = self.model(buf.ids[:rows].view(1, rows), buf.pos[:rows].view(1, rows), self)
        logits = self.model.logits(hidden[0])
        self.step = None
        if self.drop_rule is not None:
            self._drop_in_place(rows)
        return logits.argmax(dim=-1), logits

    def _drops(self, decode: list[Sequence]) -> tuple[list[int] | None, list[int] | None]:
        """Which rows end the step one entry over their policy's budget (they drop it in place
        after the forward), and the first position each keeps; (None, None) without a drop rule."""
        if self.drop_rule is None:
            return None, None
        drop, first_recent = [], []
        for s in decode:
            seen = s.num_seen + 1  # after this step
            drop.append(int(s.num_stored + 1 - self.policy.kept_tokens(seen) == 1))
            first_recent.append(self.policy.first_protected(seen))
        self.dropped = [s for s, d in zip(decode, drop, strict=True) if d]
        return drop, first_recent

    def _drop_in_place(self, rows: int) -> None:
        from backends.kvcache.kernels import ops

        buf, (by_score, sink), fields = self.buffers, self.drop_rule, self.store.fields
        ops().drop_one_in_place(self.store.k, self.store.v, fields["pos"], fields["score"] if by_score else None,
                                buf.table[:rows], buf.lens[:rows], buf.drop[:rows], buf.first_recent[:rows],
                                sink, self.store.block_size)

    def _run_graph(self, decode: list[Sequence], feed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.graphs.bucket(len(decode))
        captured = self.graphs.get(rows, lambda: self._graph_forward(rows),
                                   lambda: self.buffers.fill_padding(rows))
        before = self.buffers.fill(decode, rows, *self._drops(decode))
        if feed is not None:  # the step before has not been read back: its tokens feed this one
            self.buffers.ids[: len(decode)].copy_(feed[: len(decode)])
        self.policy.begin_step(StepBatch(decode=self.buffers.meta(rows, decode, before), prefill=[],
                                         num_decode=len(decode)))
        captured.graph.replay()
        b = len(decode)
        return captured.tokens[:b], captured.logits[:b]

    def _forward(self, decode: list[Sequence], prefill: list[Sequence],
                 feed: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The step's forward: (greedy tokens [N] on the device, or None on a dry run; logits [N, vocab])."""
        seqs = decode + prefill
        self.dropped = []
        for s in seqs:
            self.store.ensure_blocks(s.block_table)
        cfg = self.model.cfg
        graphed = self.graphs is not None and decode and not prefill
        if decode:
            self.policy.reserve(self.graphs.bucket(len(decode)) if graphed else len(decode), self.max_model_len)
        if graphed:
            greedy_t, logits = self._run_graph(decode, feed)
            n_tokens = len(decode)
        else:
            ids = [s.last_token_id for s in decode]
            positions = [s.num_seen for s in decode]
            last_rows = list(range(len(decode)))
            for s in prefill:
                ids.extend(s.all_token_ids)
                positions.extend(range(s.num_tokens))
                last_rows.append(len(ids) - 1)
            self.step = StepBatch(
                decode=self._decode_meta(decode, drops=not prefill) if decode else None,
                prefill=[self._prefill_meta(s) for s in prefill],
                num_decode=len(decode),
            )
            self.policy.begin_step(self.step)
            dev = self.device
            ids_t = torch.as_tensor([ids], device=dev)
            if feed is not None:
                ids_t[0, : len(decode)] = feed[: len(decode)]
            hidden = self.model(ids_t, torch.as_tensor([positions], device=dev), self)
            logits = self.model.logits(hidden[0, torch.as_tensor(last_rows, device=dev)])
            self.step = None
            if self.drop_rule is not None and decode and not prefill:
                self._drop_in_place(len(decode))
            if logits.device.type == "meta":  # dry run: shapes only
                self.store.flush_writes()
                return None, logits
            greedy_t = logits.argmax(dim=-1)
            n_tokens = len(ids)
        self.last_activation_bytes = (
            n_tokens * (3 * cfg.hidden_size + 2 * cfg.intermediate_size) * cfg.dtype_bytes + logits.numel() * 4
        )
        return greedy_t, logits

    @torch.inference_mode()
    def launch(self, decode: list[Sequence], prefill: list[Sequence], feed: torch.Tensor | None = None) -> LaunchedStep:
        """Start one greedy step without waiting for it: the tokens come back through ``collect``
        (a pinned copy on a GPU), so the host can prepare the next step while this one runs.
        With ``feed`` (the tokens of the step before, not read back yet, on the device; its
        first rows are this step's decode rows, in order) the decode rows' input tokens come
        from it, copied on the device."""
        greedy_t, _ = self._forward(decode, prefill, feed)
        if greedy_t is None:  # dry run
            zeros = torch.zeros(len(decode) + len(prefill), dtype=torch.int64)
            return LaunchedStep(zeros, zeros, None)
        if greedy_t.device.type != "cuda":
            return LaunchedStep(greedy_t, greedy_t, None)
        n = greedy_t.shape[0]
        self._readback = 1 - self._readback  # two buffers: one step in flight while the last is read
        host = self._host_tokens[self._readback]
        if host is None or host.shape[0] < n:
            host = self._host_tokens[self._readback] = torch.empty(max(n, 64), dtype=torch.int64, pin_memory=True)
        host[:n].copy_(greedy_t, non_blocking=True)
        done = self._readback_done[self._readback]
        done.record()
        # (a graph's token buffer is only rewritten by its next replay, which the feed precedes)
        return LaunchedStep(greedy_t, host[:n], done)

    def collect(self, launched: LaunchedStep) -> list[int]:
        """Wait for a launched step and return its tokens."""
        if launched.done is not None:
            launched.done.synchronize()
        self.store.flush_writes()
        return launched.host.tolist()

    @torch.inference_mode()
    def run(self, decode: list[Sequence], prefill: list[Sequence]) -> tuple[list[int], list[float | None]]:
        """Forward one step; return the next token of each sequence (decode ones first, then
        prefill ones), greedy, sampled or teacher-forced, and the forced tokens' log-probabilities."""
        seqs = decode + prefill
        greedy_t, logits = self._forward(decode, prefill, None)
        if greedy_t is None:
            return [0] * len(seqs), [None] * len(seqs)
        greedy = greedy_t.tolist()
        self.store.flush_writes()  # (the sync above already waited for the staged copies)
        forced_rows = [b for b, s in enumerate(seqs) if s.forced_token_ids is not None]
        logp = torch.log_softmax(logits[forced_rows], dim=-1) if forced_rows else None
        tokens, logprobs = [], []
        for b, s in enumerate(seqs):
            if s.forced_token_ids is None:
                sampled = s.sampling is not None and not s.sampling.greedy
                tokens.append(sample(logits[b], s.sampling) if sampled else greedy[b])
                logprobs.append(None)
                continue
            tok = s.forced_token_ids[len(s.output_token_ids)]
            tokens.append(tok)
            logprobs.append(float(logp[forced_rows.index(b), tok]))
        return tokens, logprobs
