"""Open-loop load over OpenAI-compatible streaming ``/v1/completions`` (vLLM's server, our Serve app).

Timing follows vLLM's own benchmark client (``vllm bench serve``) so the numbers compare: the
clock for a request starts when its POST is sent; every streamed chunk that carries a choice is a
token arrival (the first one is the first token, even with empty text); the request ends at its
last such chunk; the token count comes from the final ``usage`` chunk. ``token_times_s`` holds
one time per chunk (a chunk may carry several tokens: one ITL per chunk, as vLLM's client), and
the generated ids are kept when the server returns ``token_ids`` (vLLM's ``return_token_ids``
extension, our Serve app).

The client is aiohttp, as in vLLM's benchmark: measured against ``vllm serve`` at 2 requests/s,
httpx added 2.5-3 ms to every TTFT of ~12-15 ms (its pure-Python HTTP parsing), a client cost
that would be charged to the server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from workloads.serving.transports.base import RequestRecord, RequestSpec
from workloads.serving.transports.open_loop import run_open_loop

# What fails one request (not the trial): the server's errors, broken streams, bad JSON, timeouts.
SEND_ERRORS = (TimeoutError, aiohttp.ClientError, ValueError, OSError)

# An idle pooled connection is reused only this long, below the servers' own idle timeouts
# (vLLM's 5 s, uvicorn's default; Ray Serve's 90 s): the client lets a connection go before the
# server closes it, so a request rarely meets a close in flight. A client that lags reads the end
# of an answer late and starts its idle clock late, so ``_post`` still sends again after a close.
CONNECTION_IDLE_S = 2.0


class StepSampler(Protocol):
    """Samples server-side state (running, waiting, KV usage) while a load runs."""

    def start(self) -> None: ...

    def align(self, t0: float) -> None:
        """Measure the samples' ``t_s`` from ``t0`` (the load's start, on ``time.perf_counter``)."""
        ...

    def rows(self) -> list[dict]:
        """The samples taken so far (live metrics read them while the load runs)."""
        ...

    def stop(self) -> list[dict]: ...


@dataclass(frozen=True)
class HttpTarget:
    """Where the completions endpoint is and what model name it serves."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no trailing /v1)
    model: str
    request_timeout_s: float = 600.0
    extra_body: tuple[tuple[str, Any], ...] = ()  # extra JSON fields for every request


def completion_body(target: HttpTarget, spec: RequestSpec) -> dict[str, Any]:
    """The JSON body of one streaming completion request (greedy, forced length)."""
    body: dict[str, Any] = {
        "model": target.model,
        "prompt": spec.prompt_token_ids if spec.prompt_token_ids else spec.prompt_text,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": spec.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    body.update(dict(target.extra_body))
    return body


def _sse_payloads(line: str) -> str | None:
    """The JSON text of one server-sent-event line, or None for keep-alives and comments."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


async def _stream_into(
    client: aiohttp.ClientSession, target: HttpTarget, spec: RequestSpec, t0: float, record: RequestRecord
) -> None:
    """POST one streaming completion and fill ``record`` from its chunks."""
    body = completion_body(target, spec)
    chunks_with_choice = 0
    usage_tokens: int | None = None
    response = await _post(client, f"{target.base_url}/v1/completions", body, t0, record)
    async with response:
        if response.status != 200:
            text = (await response.read()).decode(errors="replace")
            record.error = f"HTTP {response.status}: {text[:500]}"
            return
        async for raw in response.content:  # one line at a time
            payload = _sse_payloads(raw.decode(errors="replace"))
            if payload is None:
                continue
            if payload == "[DONE]":
                break
            now = time.perf_counter() - t0
            data = json.loads(payload)
            if "error" in data and not data.get("choices"):
                record.error = f"server error: {data['error']}"
                return
            choices = data.get("choices") or []
            if choices:
                chunks_with_choice += 1
                record.add_arrival(now, choices[0].get("token_ids") or ())
            usage = data.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens")
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if not record.prompt_tokens:
        record.prompt_tokens = len(spec.prompt_token_ids)
    if usage_tokens is not None:
        record.output_tokens = int(usage_tokens)
    elif record.output_token_ids:
        record.output_tokens = len(record.output_token_ids)
    else:
        record.output_tokens = chunks_with_choice


async def _post(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float, record: RequestRecord
) -> aiohttp.ClientResponse:
    """POST and wait for the response's headers; sent again once if the connection closed first.

    A pooled keep-alive connection can be closed by the server's idle timer just as the request
    goes out on it (vLLM's is 5 s; a server whose event loop lags, on a busy host, fires it
    late): the server never read the request. The client sees the close (FIN) or, when the request
    was still unread in the server's socket, a reset. aiohttp re-sends only idempotent methods then
    (the same errors, a failed connect excepted); a greedy, forced-length completion is idempotent
    too. ``send_s`` restarts with the new send, so the wait shows in the send lag, not in TTFT.
    """
    record.send_s = time.perf_counter() - t0
    try:
        return await client.post(url, json=body)
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        record.send_s = time.perf_counter() - t0
        return await client.post(url, json=body)


async def run_schedule(
    target: HttpTarget, requests: list[RequestSpec], max_concurrency: int | None, live: list[RequestRecord] | None = None,
    on_start: Callable[[float], None] | None = None,
) -> list[RequestRecord]:
    """Send every request at its arrival time (open loop); one record per request, in order.
    ``on_start(t0)`` is called with the load's start before the first request."""
    connections = max_concurrency or max(1, len(requests))
    timeout = aiohttp.ClientTimeout(total=target.request_timeout_s, connect=30.0)
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=CONNECTION_IDLE_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:

        async def send(spec: RequestSpec, t0: float, record: RequestRecord) -> None:
            await _stream_into(client, target, spec, t0, record)

        return await run_open_loop(requests, max_concurrency, send, errors=SEND_ERRORS, on_start=on_start, live=live)


def _run_coroutine_blocking(make: Callable[[], Any]) -> Any:
    """asyncio.run, also from a thread whose event loop is already running (async Ray actors)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=worker, name="http-transport")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class HttpTransport:
    """The ``Transport`` for any OpenAI-compatible streaming completions server."""

    def __init__(self, target: HttpTarget, sampler: StepSampler | None = None):
        self.target = target
        self._sampler = sampler
        self._steps: list[dict] = []
        self._live: list[RequestRecord] = []
        self._running = False

    def live_records(self) -> list[RequestRecord]:
        """Records of the load in flight (filled in as tokens arrive), for live metrics."""
        return list(self._live)

    def run(self, requests: list[RequestSpec], max_concurrency: int | None) -> list[RequestRecord]:
        """Send every request at its arrival time; return one record per request, in order."""
        self._live, self._steps = [], []  # nothing of the previous run is read as this one's
        if self._sampler is not None:
            self._sampler.start()
        self._running = True
        try:
            align = self._sampler.align if self._sampler is not None else None
            return _run_coroutine_blocking(
                lambda: run_schedule(self.target, requests, max_concurrency, self._live, on_start=align))
        finally:
            if self._sampler is not None:
                self._steps = self._sampler.stop()
            self._running = False

    def engine_steps(self) -> list[dict]:
        """Server-side samples of the last ``run``, or so far of the one going on (empty without a sampler)."""
        if self._running and self._sampler is not None:
            return self._sampler.rows()
        return list(self._steps)
