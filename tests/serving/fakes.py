"""A test double of the engine API (backends/kvcache README) whose steps take a set time.

Used only where the test is about the transport's timing (open loop, concurrency cap): a real
engine's step time cannot be made slow on purpose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class FakeStepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    error: str | None = None


@dataclass
class FakeStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_bytes_device: int
    kv_bytes_host: int
    h2d_bytes: int
    preemptions: int


class SlowEngine:
    """Every step sleeps ``step_s`` and emits one token for every request (no batch limit)."""

    def __init__(self, step_s: float, max_len: int = 1000):
        self.step_s = step_s
        self.max_len = max_len
        self._remaining: dict[str, int] = {}
        self._too_long: list[str] = []
        self.h2d = 0

    def add_request(self, request_id, prompt_token_ids, max_tokens, ignore_eos=True) -> None:
        if len(prompt_token_ids) > self.max_len:
            self._too_long.append(request_id)
        else:
            self._remaining[request_id] = max_tokens

    def step(self) -> list[FakeStepOutput]:
        time.sleep(self.step_s)
        outs = [FakeStepOutput(r, [], True, "prompt longer than max_model_len") for r in self._too_long]
        self._too_long = []
        for rid in list(self._remaining):
            self._remaining[rid] -= 1
            done = self._remaining[rid] == 0
            outs.append(FakeStepOutput(rid, [7], done))
            if done:
                del self._remaining[rid]
        self.h2d += 100
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._remaining or self._too_long)

    def stats(self) -> FakeStats:
        n = len(self._remaining)
        return FakeStats(n, 0, n, 1000 * n, 0, self.h2d, 0)
