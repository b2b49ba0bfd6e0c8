"""In-process transport: runs an open-loop schedule directly against our ``LLMEngine``.

Two threads, so that a slow engine step never delays a send (open loop):
- the *sender* sleeps until each request's scheduled arrival (and, with ``max_concurrency``,
  until a slot is free, as vLLM's client semaphore does), stamps its send time and drops it in
  an inbox: this is the request reaching the server;
- the *engine loop* (the calling thread) drains the inbox into ``engine.add_request`` at each
  step boundary, calls ``engine.step()``, stamps every new token with the time the step
  returned, and samples ``engine.stats()`` after every step. When the engine is idle it blocks
  on the inbox until the next request arrives.
Queueing between a request's send and the step that admits it is part of its TTFT, as queueing
inside a server is. Only the engine loop touches the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workloads.serving.transports.base import RequestRecord, RequestSpec

# How long an idle engine loop waits on the inbox before re-checking (seconds).
_IDLE_POLL_S = 0.05
_ALL_SENT = object()


@dataclass(frozen=True)
class _Sent:
    spec: RequestSpec
    send_s: float


class InProcessTransport:
    """Drives an ``LLMEngine`` with an open-loop schedule; implements ``Transport``."""

    def __init__(self, engine: Any, clock: Callable[[], float] = time.perf_counter):
        self._engine = engine
        self._clock = clock
        self._steps: list[dict] = []
        self._records: dict[str, RequestRecord] = {}

    def live_records(self) -> list[RequestRecord]:
        """Records of the load in flight (filled in as tokens arrive), for live metrics."""
        return list(self._records.values())

    def engine_steps(self) -> list[dict]:
        """Rows of the ``engine_steps`` table sampled during the last ``run``."""
        return list(self._steps)

    def run(self, requests: list[RequestSpec], max_concurrency: int | None) -> list[RequestRecord]:
        """Send every request at its arrival time; return one record per request, in input order."""
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids of a load must be unique")
        records = {
            r.request_id: RequestRecord(r.request_id, r.arrival_s, prompt_tokens=len(r.prompt_token_ids))
            for r in requests
        }
        self._steps = []
        self._records = records
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        slots = threading.Semaphore(max_concurrency) if max_concurrency else None
        stop = threading.Event()
        start = self._clock()
        sender = threading.Thread(
            target=self._send_all,
            args=(sorted(requests, key=lambda r: r.arrival_s), start, inbox, slots, stop),
            name="orch-load-sender",
            daemon=True,
        )
        sender.start()
        try:
            self._serve(records, start, inbox, slots)
        finally:
            stop.set()
            sender.join()
        return [records[r.request_id] for r in requests]

    def _send_all(
        self,
        ordered: list[RequestSpec],
        start: float,
        inbox: queue.SimpleQueue,
        slots: threading.Semaphore | None,
        stop: threading.Event,
    ) -> None:
        for spec in ordered:
            delay = start + spec.arrival_s - self._clock()
            if delay > 0 and stop.wait(delay):
                return
            while slots is not None and not slots.acquire(timeout=_IDLE_POLL_S):
                if stop.is_set():
                    return
            inbox.put(_Sent(spec, self._clock() - start))
        inbox.put(_ALL_SENT)

    def _serve(
        self,
        records: dict[str, RequestRecord],
        start: float,
        inbox: queue.SimpleQueue,
        slots: threading.Semaphore | None,
    ) -> None:
        engine = self._engine
        baseline = engine.stats()
        in_flight: set[str] = set()
        all_sent = False
        step = 0
        while not (all_sent and not in_flight):
            for item in self._drain(inbox, block=not in_flight):
                if item is _ALL_SENT:
                    all_sent = True
                    continue
                spec = item.spec
                engine.add_request(spec.request_id, list(spec.prompt_token_ids), spec.max_tokens, spec.ignore_eos)
                records[spec.request_id].send_s = item.send_s
                in_flight.add(spec.request_id)
            if not in_flight:
                continue
            outputs = engine.step()
            now = self._clock() - start
            for out in outputs:
                record = records[out.request_id]
                for token in out.new_token_ids:
                    record.output_token_ids.append(int(token))
                    record.token_times_s.append(now)
                if out.new_token_ids and record.first_token_s is None:
                    record.first_token_s = now
                if out.error is not None:
                    record.error = out.error
                if out.finished and out.request_id in in_flight:
                    self._finish(record, now, in_flight, slots)
            if in_flight and not engine.has_unfinished():
                # The engine forgot requests without finishing them: record, never hang.
                for request_id in list(in_flight):
                    records[request_id].error = "engine dropped the request without finishing it"
                    self._finish(records[request_id], now, in_flight, slots)
            self._steps.append(self._step_row(step, now, engine.stats(), baseline))
            step += 1

    @staticmethod
    def _finish(
        record: RequestRecord, now: float, in_flight: set[str], slots: threading.Semaphore | None
    ) -> None:
        record.finish_s = now
        record.output_tokens = len(record.output_token_ids)
        in_flight.discard(record.request_id)
        if slots is not None:
            slots.release()

    @staticmethod
    def _drain(inbox: queue.SimpleQueue, block: bool) -> list:
        """Everything in the inbox now; when ``block``, wait (briefly) for at least one item."""
        items = []
        try:
            items.append(inbox.get(timeout=_IDLE_POLL_S) if block else inbox.get_nowait())
            while True:
                items.append(inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _step_row(self, step: int, t_s: float, stats: Any, baseline: Any) -> dict:
        h2d_total = stats.h2d_bytes - baseline.h2d_bytes
        preemptions_total = stats.preemptions - baseline.preemptions
        previous = self._steps[-1] if self._steps else {"h2d_bytes_total": 0, "preemptions_total": 0}
        return {
            "step": step,
            "t_s": t_s,
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_blocks_used": stats.kv_blocks_used,
            "kv_bytes_device": stats.kv_bytes_device,
            "kv_bytes_host": stats.kv_bytes_host,
            "h2d_bytes": h2d_total - previous["h2d_bytes_total"],
            "preemptions": preemptions_total - previous["preemptions_total"],
            "h2d_bytes_total": h2d_total,
            "preemptions_total": preemptions_total,
        }
