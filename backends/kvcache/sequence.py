"""One request as the engine sees it: tokens so far, KV blocks held, and its state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from backends.kvcache.sampling import SamplingParams

PENDING_TOKEN = -1  # an output token computed on the device and not read back yet


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    ignore_eos: bool = True
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_seen: int = 0  # tokens whose K/V have been computed (the next position to feed)
    num_stored: int = 0  # K/V entries still held in the store (fewer than num_seen after eviction)
    forced_token_ids: list[int] | None = None  # teacher forcing (score())
    sampling: SamplingParams | None = None  # None: greedy
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None
    preempted: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        """The token fed to the next decode step."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def is_done(self) -> bool:
        """Reached max_tokens, or emitted EOS when EOS is honoured."""
        return self.is_done_after(len(self.output_token_ids))

    def is_done_after(self, n_outputs: int) -> bool:
        """Whether the request ends with its first ``n_outputs`` output tokens (later ones may be
        pending on the device under asynchronous scheduling)."""
        if n_outputs >= self.max_tokens:
            return True
        return (
            not self.ignore_eos
            and self.eos_token_id is not None
            and n_outputs > 0
            and self.output_token_ids[n_outputs - 1] == self.eos_token_id
        )

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all cached state; the tokens themselves are kept."""
        self.block_table = []
        self.num_seen = 0
        self.num_stored = 0
        self.status = SeqStatus.WAITING
        self.preempted += 1
