"""The open-loop core of the asyncio transports (HTTP and vLLM in process).

Request i waits for its scheduled arrival whatever the system's state, then for a
``max_concurrency`` slot (as vLLM's benchmark client's semaphore), and is sent; one failed
request is a failed record, never a failed trial. Each transport supplies only ``send``: how one
request reaches its system and how its streamed outputs fill the record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from workloads.serving.transports.base import RequestRecord, RequestSpec

# send(spec, t0, record): send one request and fill ``record`` (times in seconds after t0).
Send = Callable[[RequestSpec, float, RequestRecord], Awaitable[None]]


async def run_open_loop(
    requests: list[RequestSpec],
    max_concurrency: int | None,
    send: Send,
    errors: tuple[type[BaseException], ...] = (Exception,),
    on_start: Callable[[float], None] | None = None,
    live: list[RequestRecord] | None = None,
) -> list[RequestRecord]:
    """Send every request at its arrival time; one record per request, in order.

    ``errors``: the exceptions of ``send`` that fail only their request. ``on_start(t0)`` is
    called with the schedule's start time before the first request. ``live`` receives each
    record as it is created, to be read while the load runs (live metrics).
    """
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()
    if on_start is not None:
        on_start(t0)

    async def one(spec: RequestSpec) -> RequestRecord:
        record = RequestRecord(request_id=spec.request_id, arrival_s=spec.arrival_s)
        if live is not None:
            live.append(record)
        delay = t0 + spec.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is not None:
            await gate.acquire()
        try:
            await send(spec, t0, record)
        except errors as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            if gate is not None:
                gate.release()
        if record.error is None and record.output_tokens == 0:
            record.error = "no tokens received"
        if record.error is not None:
            # A failed request ends when its error arrives (not at its last token, if any): the
            # benchmark's duration, and so every throughput, includes the time it took to fail.
            record.finish_s = time.perf_counter() - t0
        else:
            record.finish_s = record.token_times_s[-1] if record.token_times_s else None  # only now: live counts it done
        return record

    return list(await asyncio.gather(*(one(spec) for spec in requests)))
