"""The in-process ``Transport`` for vLLM: requests go straight to ``AsyncLLM`` on its own loop.

The engine host (backends/kvcache/vllm/async_engine.py) streams each request's new tokens; this
transport runs the open-loop schedule on the host's event loop and stamps every output as it
arrives. Engine rows come per iteration from the host's stat recorder.
"""

from __future__ import annotations

import time
from typing import Any

from workloads.serving.transports.base import RequestRecord, RequestSpec
from workloads.serving.transports.open_loop import run_open_loop


class VLLMEngineTransport:
    """Drives an ``AsyncEngineHost`` with an open-loop schedule; implements ``Transport``."""

    def __init__(self, host: Any):
        self.host = host
        self._steps: list[dict] = []
        self._live: list[RequestRecord] = []

    def live_records(self) -> list[RequestRecord]:
        """Records of the load in flight (filled in as tokens arrive), for live metrics."""
        return list(self._live)

    def run(self, requests: list[RequestSpec], max_concurrency: int | None) -> list[RequestRecord]:
        """Send every request at its arrival time; return one record per request, in order."""
        return self.host.call(self._run(requests, max_concurrency))

    def engine_steps(self) -> list[dict]:
        """One row per engine iteration of the last ``run``, or so far of the one going on."""
        return list(self._steps)

    def _start_recording(self, t0: float) -> None:
        self.host.recorder.start(t0)
        self._steps = self.host.recorder.rows  # the recorder's own list, growing while the load runs

    async def _run(self, requests: list[RequestSpec], max_concurrency: int | None) -> list[RequestRecord]:
        self._live, self._steps = [], []  # nothing of the previous run is read as this one's
        try:
            return await run_open_loop(requests, max_concurrency, self._send, on_start=self._start_recording,
                                       live=self._live)
        finally:
            self._steps = self.host.recorder.stop()

    async def _send(self, spec: RequestSpec, t0: float, record: RequestRecord) -> None:
        record.send_s = time.perf_counter() - t0
        async for new_tokens, prompt_tokens in self.host.stream(
            spec.prompt_token_ids, spec.prompt_text, spec.max_tokens, spec.ignore_eos, spec.request_id
        ):
            if new_tokens:
                record.add_arrival(time.perf_counter() - t0, new_tokens)
            if prompt_tokens is not None:
                record.prompt_tokens = prompt_tokens
        record.output_tokens = len(record.output_token_ids)
        if not record.prompt_tokens:
            record.prompt_tokens = len(spec.prompt_token_ids)
