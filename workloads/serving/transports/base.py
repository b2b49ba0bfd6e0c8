"""How the load generator reaches a system under test.

A transport executes an open-loop schedule (request i is sent at ``arrival_s[i]`` whatever
the system's state) and returns one record per request with wall-clock timestamps, plus the
engine-side step samples it could observe. In-process transports drive our engine directly;
HTTP transports speak OpenAI-compatible streaming ``/v1/completions`` (vLLM's server and our
Ray Serve deployment alike), so every backend is measured by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RequestSpec:
    """One request of a load: its scheduled arrival and its prompt."""

    request_id: str
    arrival_s: float  # scheduled send time, seconds after the load's start
    prompt_token_ids: list[int]
    max_tokens: int
    prompt_text: str | None = None
    ignore_eos: bool = True
    answer: str | None = None  # needle prompts: the value a correct output states


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds after the load's start."""

    request_id: str
    arrival_s: float
    send_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None  # set once the request is done (its last token, or its error)
    token_times_s: list[float] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    def add_arrival(self, now_s: float, token_ids: Iterable[int] = ()) -> None:
        """One streamed output (a chunk of one or more tokens) arrived at ``now_s``."""
        if self.first_token_s is None:
            self.first_token_s = now_s
        self.token_times_s.append(now_s)
        self.output_token_ids.extend(int(t) for t in token_ids)


class Transport(Protocol):
    """Runs a schedule against one system under test."""

    def run(self, requests: list[RequestSpec], max_concurrency: int | None) -> list[RequestRecord]:
        """Send every request at its arrival time; return one record per request, in order."""
        ...

    def engine_steps(self) -> list[dict]:
        """Engine-side samples (rows of the ``engine_steps`` table) collected during ``run``."""
        ...
