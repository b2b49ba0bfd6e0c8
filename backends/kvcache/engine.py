"""LLMEngine: the public API (add_request / step / stats) over scheduler, runner and policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.kvcache.block_manager import BlockManager
from backends.kvcache.config import EngineConfig, ModelConfig
from backends.kvcache.kernels import resolve_backend
from backends.kvcache.kv_store import PagedKVStore
from backends.kvcache.loader import load_model
from backends.kvcache.model_runner import LaunchedStep, ModelRunner
from backends.kvcache.policies import make_policy
from backends.kvcache.sampling import SamplingParams
from backends.kvcache.scheduler import Scheduler
from backends.kvcache.sequence import PENDING_TOKEN, SeqStatus, Sequence


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    error: str | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_bytes_device: int  # K/V bytes resident on the device (persistent + the step's fetched peak)
    kv_bytes_host: int  # K/V bytes in host memory
    h2d_bytes: int  # cumulative host -> device bytes of the copies issued
    preemptions: int  # cumulative
    d2h_bytes: int = 0  # cumulative device -> host bytes of the copies issued (new K/V into host memory)


@dataclass
class InFlightStep:
    """A launched step whose tokens are still on the device."""

    rows: list[tuple[Sequence, int]]  # per row: the sequence and the index of its pending token
    launched: LaunchedStep


class LLMEngine:
    """A continuous-batching engine for decoder-only models with a pluggable KV cache policy."""

    def __init__(self, config: EngineConfig):
        self.config = config
        loaded = load_model(config)
        self.model = loaded.model
        self.model_config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.weights_dir = loaded.weights_dir  # the HF folder of real weights, else None
        self.device = torch.device(config.device)
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.policy = make_policy(config.policy, config.policy_params, self.model, cfg, self.device)
        self.policy.prepare(self.tokenizer, self.weights_dir)
        num_blocks = self._num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size)
        with torch.inference_mode():  # the store is only ever touched inside inference mode
            self.store = self._make_store(num_blocks)
            if self.device.type == "cuda":  # pinned staging for new K/V, before anything is measured
                self.store.preallocate_staging(config.max_num_batched_tokens + config.max_num_seqs)
            self.policy.bind(self.store)
        self.scheduler = Scheduler(self.block_manager, self.policy, config.max_num_seqs, config.max_num_batched_tokens)
        self.attention_backend = resolve_backend(config.attention_backend, self.device)
        if hasattr(self.model, "use_fused_kernels"):
            self.model.use_fused_kernels(self.attention_backend == "triton")
        self.runner = ModelRunner(
            self.model, self.policy, self.store, self.device, backend=self.attention_backend,
            cuda_graphs=config.cuda_graphs, max_batch=config.max_num_seqs, max_model_len=self.max_model_len,
        )
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []
        # asynchronous scheduling: on a GPU unless disabled (a host-resident store's staged
        # writes land at the read-back, so a step with staged writes does not run ahead)
        wanted = config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        self._async = bool(wanted)
        self._in_flight: InFlightStep | None = None
        self.weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        self.reset_peaks()

    def _make_store(self, num_blocks: int) -> PagedKVStore:
        return PagedKVStore(
            self.model_config,
            num_blocks,
            self.config.block_size,
            self.policy.store_device(),
            self.config.torch_dtype,
            pin_memory=self.policy.kv_on_host and self.device.type == "cuda",
            # an explicit budget on a GPU is reserved up front (as vLLM does), in host memory too;
            # a policy that evicts grows its device store to what it keeps, so the saving is real
            preallocate=self.device.type == "cuda" and (self.policy.kv_on_host or not self.policy.lossy)
            and (self.config.kv_cache_bytes is not None or self.config.kv_cache_blocks is not None),
            host_resident=self.policy.kv_on_host,
        )

    def _num_blocks(self) -> int:
        c, bs = self.config, self.config.block_size
        if c.kv_cache_blocks is not None:
            return int(c.kv_cache_blocks)
        if c.kv_cache_bytes is not None:
            return int(c.kv_cache_bytes) // (bs * self.model_config.kv_bytes_per_token)
        return c.max_num_seqs * -(-self.max_model_len // bs)

    @property
    def kv_budget_bytes(self) -> int:
        """The block budget in bytes."""
        return self.block_manager.num_blocks * self.config.block_size * self.model_config.kv_bytes_per_token

    # --- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], max_tokens: int, ignore_eos: bool = True,
        _forced: list[int] | None = None, sampling: SamplingParams | None = None,
    ) -> None:
        """Queue a request (greedy unless ``sampling`` says otherwise); problems become an error
        output at the next step, not an exception."""
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            max_tokens=int(max_tokens),
            ignore_eos=ignore_eos,
            eos_token_id=self.model_config.eos_token_id,
            forced_token_ids=_forced,
            sampling=sampling,
        )
        error = self._check(seq)
        if request_id in self._seqs:
            error = f"duplicate request_id {request_id!r}"
        if error:
            self._pending.append(StepOutput(request_id, [], True, error))
            return
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _check(self, seq: Sequence) -> str | None:
        n, m = len(seq.prompt_token_ids), seq.max_tokens
        if n == 0:
            return "empty prompt"
        if m < 1:
            return f"max_tokens must be >= 1, got {m}"
        if n + m > self.max_model_len:
            return f"prompt ({n}) + max_tokens ({m}) exceeds max_model_len {self.max_model_len}"
        if max(seq.prompt_token_ids) >= self.model_config.vocab_size or min(seq.prompt_token_ids) < 0:
            return f"token id out of range [0, {self.model_config.vocab_size})"
        if not self.scheduler.fits_ever(n, m):
            return f"request needs more KV blocks than the whole budget ({self.block_manager.num_blocks})"
        return None

    def has_unfinished(self) -> bool:
        """Requests waiting, running, or with undelivered tokens or errors."""
        return bool(self._pending) or self._in_flight is not None or self.scheduler.has_unfinished()

    # --- one iteration -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduler iteration: every running request decodes a token and waiting ones are
        admitted (prefilled) in the same forward; returns the new tokens and errors.

        With asynchronous scheduling a greedy step's tokens are read back at the next call,
        after that call has launched its own forward (fed the tokens on the device), so the host
        work of a step overlaps the GPU's; a step that cannot run ahead reads them first."""
        outputs, self._pending = self._pending, []
        if self._in_flight is not None and not self._can_run_ahead():
            outputs += self._resolve()
        if not self.scheduler.has_unfinished():
            return outputs
        decode, prefill = self.scheduler.schedule()
        seqs = decode + prefill
        head = self.scheduler.waiting[0] if self.scheduler.waiting else None
        if not seqs and head is not None and not self.block_manager.can_hold(head, head.num_tokens):
            # the queue head can never fit again (grew past the budget while preempted)
            seq = self.scheduler.waiting.popleft()
            self._seqs.pop(seq.request_id, None)
            outputs.append(StepOutput(seq.request_id, [], True, "cannot fit in the KV budget after preemption"))
            return outputs
        if not seqs:
            return outputs
        launched = None
        if self._async and all(s.forced_token_ids is None and (s.sampling is None or s.sampling.greedy)
                               for s in seqs):
            # running ahead, the decode rows are the step in flight's rows, in order
            feed = self._in_flight.launched.tokens if self._in_flight is not None else None
            launched = self.runner.launch(decode, prefill, feed)
        else:
            tokens, logprobs = self.runner.run(decode, prefill)
        self._account(decode, prefill)
        if launched is not None:
            rows = []
            for seq in seqs:
                seq.output_token_ids.append(PENDING_TOKEN)
                rows.append((seq, len(seq.output_token_ids) - 1))
            if self._in_flight is not None:
                outputs += self._resolve()
            self._in_flight = InFlightStep(rows, launched)
            return outputs
        for seq, tok, lp in zip(seqs, tokens, logprobs, strict=True):
            seq.output_token_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            done = seq.is_done()
            if done:
                self._finish(seq)
            outputs.append(StepOutput(seq.request_id, [tok], done))
        return outputs

    def _account(self, decode: list[Sequence], prefill: list[Sequence]) -> None:
        """After a forward: what each sequence has seen and stores, the peaks, and eviction."""
        for seq in decode:
            seq.num_seen += 1
            seq.num_stored += 1
        for seq in prefill:
            seq.num_seen = seq.num_tokens
            seq.num_stored = self.policy.prefill_stored(seq.num_tokens)
        self._update_peaks(self.stored_tokens())  # before eviction: the step really held these
        for seq in self.runner.dropped:  # dropped one entry in place during the step
            seq.num_stored -= 1
            self.block_manager.shrink(seq, seq.num_stored)
        self._evict_all(decode + prefill)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)

    def _can_run_ahead(self) -> bool:
        """Whether the next step may launch before the step in flight is read back: the same
        sequences decode again (no admission, none at its length limit, no preemption)."""
        sched, flight = self.scheduler, self._in_flight
        if self.store.has_staged_writes():  # K/V staged for a host store land there at the read-back
            return False
        if sched.waiting or not sched.running or len(sched.running) != len(flight.rows):
            return False
        if any(s is not f for s, (f, _) in zip(sched.running, flight.rows, strict=True)):
            return False  # (the same sequences in the same order: the fed tokens are row for row)
        if any(len(s.output_token_ids) >= s.max_tokens for s in sched.running):
            return False
        bm = self.block_manager
        need = sum(max(0, bm.blocks_for(s.num_stored + 1) - len(s.block_table)) for s in sched.running)
        return need <= bm.num_blocks - bm.num_used

    def _resolve(self) -> list[StepOutput]:
        """Read back the step in flight: its tokens replace the pending ones; a sequence that
        ended (EOS) is finished now, and any later pending token of it is dropped."""
        flight, self._in_flight = self._in_flight, None
        tokens = self.runner.collect(flight.launched)
        outputs = []
        for (seq, at), tok in zip(flight.rows, tokens, strict=True):
            if seq.status is SeqStatus.FINISHED:  # ended at the step before (its row ran anyway)
                continue
            seq.output_token_ids[at] = tok
            done = seq.is_done_after(at + 1)
            if done:
                del seq.output_token_ids[at + 1 :]
                self._finish(seq)
            outputs.append(StepOutput(seq.request_id, [tok], done))
        return outputs

    def _evict_all(self, seqs: list[Sequence]) -> None:
        """Bring every sequence down to what its policy keeps: sequences one entry over (the
        steady state of decoding) drop it in place, all in one batched move; larger drops
        (after a prefill) compact the sequence's entries."""
        one_over = []
        for seq in seqs:
            excess = seq.num_stored - self.policy.kept_tokens(seq.num_seen)
            if excess == 1 and self.policy.evicts_in_place():
                one_over.append(seq)
            elif excess > 0:
                self._evict(seq)
        if one_over:
            self._drop_one(one_over)

    def _drop_one(self, seqs: list[Sequence]) -> None:
        """Per layer and KV head, the entry the policy ranks lowest is overwritten by the
        sequence's last entry (as H2O's own code replaces one slot); entry order is not kept."""
        stored = [s.num_stored for s in seqs]
        slots = self.store.slots([s.block_table for s in seqs], stored)  # [B, W]
        key = self.policy.eviction_key(seqs, slots)  # [L, B, W, KVH]
        width = slots.shape[1]
        valid = torch.arange(width, device=slots.device) < torch.tensor(stored, device=slots.device).unsqueeze(1)
        drop = key.masked_fill(~valid[None, :, :, None], torch.inf).argmin(dim=2)  # [L, B, KVH]
        layers, b, heads = drop.shape
        dst = slots.gather(1, drop.permute(1, 0, 2).reshape(b, -1)).view(b, layers, heads)
        last = torch.tensor([n - 1 for n in stored], device=slots.device)
        src = slots[torch.arange(b, device=slots.device), last].view(b, 1, 1).expand(b, layers, heads)
        self.store.move(dst, src)
        for seq in seqs:
            seq.num_stored -= 1
            self.block_manager.shrink(seq, seq.num_stored)

    def _evict(self, seq: Sequence) -> None:
        slots = self.store.slots([seq.block_table], [seq.num_stored])[0]
        keep = self.policy.select_keep(seq, slots)
        if keep is None:
            return
        self.store.compact(slots, keep)
        seq.num_stored = keep.shape[1]
        self.block_manager.shrink(seq, seq.num_stored)

    # --- accounting ----------------------------------------------------------------------
    def stored_tokens(self) -> int:
        """K/V entries held by running sequences."""
        return sum(s.num_stored for s in self.scheduler.running)

    def stats(self) -> EngineStats:
        """Engine state now (counters are cumulative)."""
        stored = self.stored_tokens()
        fetched = self.policy.step_fetch_peak if self.scheduler.running else 0
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used,
            kv_bytes_device=self.policy.device_bytes(stored) + fetched,
            kv_bytes_host=self.policy.host_bytes(stored),
            h2d_bytes=self.policy.h2d_bytes,
            preemptions=self.scheduler.preemptions,
            d2h_bytes=self.policy.d2h_bytes,
        )

    def _update_peaks(self, stored_before_finish: int) -> None:
        transient = self.policy.step_fetch_peak + self.policy.step_select_peak
        resident = self.policy.device_bytes(stored_before_finish) + transient
        self._peak_kv = max(self._peak_kv, resident)
        if self.device.type != "cuda":
            store_dev = self.store.bytes_allocated() if not self.policy.kv_on_host else 0
            tracked = self.weight_bytes + store_dev + self.policy.step_fetch_peak + self.runner.last_activation_bytes
            self._peak_tracked = max(self._peak_tracked, tracked)

    def peak_kv_bytes(self) -> int:
        """Peak device K/V bytes since construction or reset_peaks(): on a GPU what the store and
        the policy's device buffers allocated (fetched K/V included); elsewhere the entries held."""
        if self.device.type == "cuda":
            return self.store.memory.peak
        return self._peak_kv

    def peak_device_bytes(self) -> int:
        """CUDA: the allocator's peak; CPU: tracked weights + K/V storage + activation estimate."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._peak_tracked

    def reset_peaks(self) -> None:
        """Start peak tracking afresh."""
        self._peak_kv = self.stats().kv_bytes_device
        self._peak_tracked = self.weight_bytes
        self.store.memory.reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def kept_positions(self, request_id: str) -> torch.Tensor:
        """Positions of the entries a running request keeps, [layers, entries, kv_heads]
        (policies that track positions: h2o, streaming)."""
        seq = self._seqs[request_id]
        if "pos" not in self.store.fields:
            raise ValueError(f"policy {self.policy.name!r} does not track positions")
        slots = self.store.slots([seq.block_table], [seq.num_stored])[0]
        return self.store.fields["pos"][:, slots].cpu()

    # --- convenience ---------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = True) -> list[list[int]]:
        """Greedy-decode every prompt to completion; returns the generated tokens of each."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine")
        ids = [f"gen-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts, strict=True):
            self.add_request(rid, p, max_tokens, ignore_eos)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                if o.error:
                    raise ValueError(f"request {o.request_id}: {o.error}")
                out[o.request_id].extend(o.new_token_ids)
        return [out[rid] for rid in ids]

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs of token_ids[prompt_len:], decoding through the cache policy."""
        if self.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        if not 0 < prompt_len < len(token_ids):
            raise ValueError("need 0 < prompt_len < len(token_ids)")
        target = list(token_ids[prompt_len:])
        self.add_request("__score__", token_ids[:prompt_len], len(target), True, _forced=target)
        seq = self._seqs.get("__score__")
        while self.has_unfinished():
            for o in self.step():
                if o.error:
                    raise ValueError(o.error)
        return list(seq.logprobs) if seq is not None else []
