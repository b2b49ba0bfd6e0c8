"""Per-interval serving metrics while a load runs, through the trial's live ``report`` callback.

Works with any transport that exposes ``live_records()`` (the records of the load in flight,
filled in as tokens arrive) and ``engine_steps()``; every shipped transport does. Each
interval reports completed requests/s, output tokens/s, the TTFTs of requests whose first
token arrived, their mean, and the peak KV bytes in use over the interval's engine steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

INTERVAL_S = 1.0


class IntervalMonitor:
    """A thread that reports one record per interval while ``transport.run`` is going."""

    def __init__(self, transport: Any, report: Callable[..., None], interval_s: float = INTERVAL_S):
        self.transport = transport
        self.report = report
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orch-serving-live", daemon=True)
        self._seen_first: set[str] = set()
        self._completed = 0
        self._tokens = 0
        self._interval = 0
        self._steps_seen = 0

    def __enter__(self) -> IntervalMonitor:
        if hasattr(self.transport, "live_records"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            now = time.perf_counter()
            try:
                self.tick(now - last)
            except Exception:  # live metrics are best effort: the load and its records go on
                return
            last = now

    def tick(self, elapsed_s: float) -> dict[str, Any]:
        """Report what changed since the previous tick; returns the record."""
        records = list(self.transport.live_records())
        completed = sum(1 for r in records if r.finish_s is not None and r.error is None)
        # a streamed chunk may carry several tokens: count the ids where the transport has them
        tokens = sum(len(r.output_token_ids) or len(r.token_times_s) for r in records)
        ttfts = []
        for r in records:
            if r.first_token_s is not None and r.send_s is not None and r.request_id not in self._seen_first:
                self._seen_first.add(r.request_id)
                ttfts.append(r.first_token_s - r.send_s)
        steps = self.transport.engine_steps()[self._steps_seen :]
        self._steps_seen += len(steps)
        record: dict[str, Any] = {
            "requests_per_s": (completed - self._completed) / elapsed_s,
            "output_tokens_per_s": (tokens - self._tokens) / elapsed_s,
            "completed": completed,
            "ttft_s": ttfts,
        }
        if ttfts:
            record["ttft_ms_mean"] = 1000 * sum(ttfts) / len(ttfts)
        if steps:  # the interval's peak: a sample at the tick alone often finds the cache between requests
            record["kv_bytes_device"] = max(s.get("kv_bytes_device") or 0 for s in steps)
            record["kv_bytes_host"] = max(s.get("kv_bytes_host") or 0 for s in steps)
        self._completed, self._tokens = completed, tokens
        self._interval += 1
        self.report(record, self._interval)
        return record
