"""Continuous batching: which sequences run this step, under the block budget.

Every step, each running sequence decodes one token, and waiting requests are admitted
(prefilled in the same forward) as soon as batch slots and blocks allow. When a decode cannot
get a block, the most recently admitted sequence is preempted by recompute (its blocks freed,
it re-enters the queue front).
"""

from __future__ import annotations

from collections import deque

from backends.kvcache.block_manager import BlockManager
from backends.kvcache.policies.base import CachePolicy
from backends.kvcache.sequence import SeqStatus, Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: CachePolicy, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.policy = blocks, policy
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def peak_entries(self, prompt_len: int, max_tokens: int) -> int:
        """Most entries a request ever needs stored at once (prefill, then decode under eviction)."""
        last = prompt_len + max_tokens - 1  # the final token is never stored
        return max(self.policy.prefill_stored(prompt_len), min(last, self.policy.kept_tokens(last - 1) + 1))

    def fits_ever(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether the request could complete with the whole budget to itself."""
        return self.blocks.blocks_for(self.peak_entries(prompt_len, max_tokens)) <= self.blocks.num_blocks

    def add(self, seq: Sequence) -> None:
        """Queue a new request."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Any request waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences that decode one token, sequences admitted for prefill) for this step."""
        decode: list[Sequence] = []
        queue = deque(self.running)
        preempted = False
        while queue:
            seq = queue.popleft()
            while not self.blocks.can_hold(seq, seq.num_stored + 1):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_stored + 1)
                decode.append(seq)
        self.running = list(decode)
        prefill: list[Sequence] = []
        longest = 0
        # admit waiting requests into the same step while slots, blocks and the token budget allow
        # (not right after a preemption: that would only evict someone again)
        while (not preempted or not decode) and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            padded = max(longest, n) * (len(prefill) + 1)
            if prefill and padded > self.max_num_batched_tokens:
                break
            stored = self.policy.prefill_stored(n)  # what the prompt keeps in the store
            if not self.blocks.can_hold(seq, stored):
                break
            self.blocks.grow(seq, stored)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            prefill.append(seq)
            self.running.append(seq)
            longest = max(longest, n)
        return decode, prefill

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished sequence."""
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        self.running.remove(seq)
