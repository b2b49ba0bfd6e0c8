"""The OpenAI streaming client (HTTP transport) and the /metrics sampler against a fake server."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.vllm.fake_openai import METRICS_TEXT, FakeOpenAI
from workloads.serving.metrics.latency import compute_metrics
from workloads.serving.transports.base import RequestSpec
from workloads.serving.transports.http import CONNECTION_IDLE_S, HttpTarget, HttpTransport, completion_body
from workloads.serving.transports.prometheus import PrometheusStepSampler, cache_shape, parse_prometheus


def _spec(i: int, arrival_s: float, max_tokens: int = 5, prompt: list[int] | None = None) -> RequestSpec:
    return RequestSpec(f"r{i}", arrival_s, prompt if prompt is not None else [1, 2, 3], max_tokens)


def test_body_is_a_greedy_streaming_completion_with_usage() -> None:
    body = completion_body(HttpTarget("http://x", "m"), _spec(0, 0.0, 7))
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 7 and body["model"] == "m"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0


def test_records_every_token_with_its_time_and_usage_counts() -> None:
    with FakeOpenAI(first_delay_s=0.1, chunk_delay_s=0.02) as fake:
        transport = HttpTransport(HttpTarget(fake.url, "fake"))
        records = transport.run([_spec(0, 0.0), _spec(1, 0.3)], max_concurrency=None)
    first, second = records
    assert [r.request_id for r in records] == ["r0", "r1"]
    assert first.error is None and first.output_tokens == 5 and first.prompt_tokens == 3
    assert first.output_token_ids == [0, 1, 2, 3, 4]
    assert len(first.token_times_s) == 5 and first.token_times_s == sorted(first.token_times_s)
    assert first.first_token_s - first.send_s == pytest.approx(0.1, abs=0.08)
    assert first.finish_s == first.token_times_s[-1]
    # Open loop: the second request leaves at its scheduled time, not when the first is done.
    assert second.send_s == pytest.approx(0.3, abs=0.05)
    metrics = compute_metrics(records)
    assert metrics.completed == 2 and metrics.total_output_tokens == 10
    assert metrics.samples["tpot"][0] == pytest.approx(0.02, abs=0.015)


def test_a_chunk_with_several_tokens_is_one_arrival_of_several_tokens() -> None:
    with FakeOpenAI(tokens_per_chunk=3, chunk_delay_s=0.05) as fake:
        (record,) = HttpTransport(HttpTarget(fake.url, "fake")).run([_spec(0, 0.0, max_tokens=7)], None)
    assert record.output_tokens == 7 and record.output_token_ids == list(range(7))
    assert len(record.token_times_s) == 3  # chunks of 3 + 3 + 1 tokens: one ITL per chunk, as vLLM
    (metrics,) = compute_metrics([record]).per_request
    assert len(metrics.itl_s) == 2 and metrics.tpot_s == pytest.approx(0.1 / 6, abs=0.01)


def test_an_http_error_becomes_the_request_error() -> None:
    with FakeOpenAI() as fake:
        bad, good = HttpTransport(HttpTarget(fake.url, "fake")).run(
            [_spec(0, 0.0, prompt=[666, 1]), _spec(1, 0.0)], None
        )
    assert bad.error is not None and "HTTP 400" in bad.error and "bad prompt" in bad.error
    assert bad.first_token_s is None and good.error is None
    assert compute_metrics([bad, good]).failed == 1


def test_a_server_that_is_not_there_fails_requests_not_the_run() -> None:
    (record,) = HttpTransport(HttpTarget("http://127.0.0.1:9", "x", request_timeout_s=2)).run([_spec(0, 0.0)], None)
    assert record.error is not None and record.output_tokens == 0


def test_max_concurrency_caps_requests_in_flight() -> None:
    with FakeOpenAI(first_delay_s=0.1) as fake:
        records = HttpTransport(HttpTarget(fake.url, "fake")).run([_spec(i, 0.0) for i in range(6)], 2)
        assert fake.max_in_flight == 2
    assert all(r.error is None for r in records)


def test_runs_from_inside_a_running_event_loop() -> None:
    async def inside() -> list:
        with FakeOpenAI() as fake:
            return HttpTransport(HttpTarget(fake.url, "fake")).run([_spec(0, 0.0)], None)

    (record,) = asyncio.run(inside())
    assert record.output_tokens == 5


def test_prometheus_text_is_parsed_with_labels() -> None:
    metrics = parse_prometheus(METRICS_TEXT)
    assert metrics["vllm:num_requests_running"][0][1] == 3.0
    assert metrics["vllm:kv_cache_usage_perc"][0][0] == {"engine": "0", "model_name": "fake"}
    shape = cache_shape(metrics)
    assert shape is not None and (shape.num_blocks, shape.block_size) == (400, 32)


def test_sampler_turns_scrapes_into_engine_step_rows() -> None:
    with FakeOpenAI() as fake:
        sampler = PrometheusStepSampler(f"{fake.url}/metrics", kv_bytes_per_token=1000, interval_s=0.05)
        transport = HttpTransport(HttpTarget(fake.url, "fake"), sampler=sampler)
        transport.run([_spec(0, 0.0), _spec(1, 0.2)], None)
        sampler.close()
    rows = transport.engine_steps()
    assert len(rows) >= 3 and [r["step"] for r in rows] == list(range(len(rows)))
    row = rows[0]
    # 25% of 400 blocks of 32 tokens at 1000 bytes per token.
    assert row["running"] == 3 and row["waiting"] == 2 and row["kv_blocks_used"] == 100
    assert row["kv_bytes_device"] == 100 * 32 * 1000
    # Counters are reported relative to the start of the run.
    assert row["preemptions_total"] == 0 and row["kv_bytes_host"] == 0 and row["h2d_bytes_total"] == 0


def test_engine_steps_grow_while_the_load_runs_for_live_metrics() -> None:
    with FakeOpenAI() as fake:
        sampler = PrometheusStepSampler(f"{fake.url}/metrics", kv_bytes_per_token=1000, interval_s=0.05)
        transport = HttpTransport(HttpTarget(fake.url, "fake"), sampler=sampler)
        load = threading.Thread(target=transport.run, args=([_spec(0, 0.0), _spec(1, 0.6)], None))
        load.start()
        seen_live = []
        while load.is_alive():
            seen_live.append(len(transport.engine_steps()))
            time.sleep(0.05)
        load.join()
        sampler.close()
    assert max(seen_live) >= 3 and seen_live == sorted(seen_live)  # rows appeared during the load
    assert len(transport.engine_steps()) >= max(seen_live)


def test_samples_are_timed_on_the_loads_clock() -> None:
    class Recording:
        def __init__(self) -> None:
            self.started = self.origin = None

        def start(self) -> None:
            self.started = time.perf_counter()

        def align(self, t0: float) -> None:
            self.origin = t0

        def rows(self) -> list[dict]:
            return []

        def stop(self) -> list[dict]:
            return []

    sampler = Recording()
    with FakeOpenAI() as fake:
        (record,) = HttpTransport(HttpTarget(fake.url, "fake"), sampler=sampler).run([_spec(0, 0.2)], None)
        done = time.perf_counter()
    # the load's t = 0: after the sampler started, 0.2 s before the request's send
    assert sampler.started <= sampler.origin and sampler.origin + record.send_s <= done and record.send_s >= 0.2

    metrics = PrometheusStepSampler("http://fake/metrics", kv_bytes_per_token=1, interval_s=30.0)
    metrics._client = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200, text="")))
    metrics.start()
    metrics.align(time.perf_counter() + 10.0)  # a load that starts in 10 s
    assert metrics.stop()[-1]["t_s"] == pytest.approx(-10.0, abs=1.0)


def test_sampler_scrapes_once_more_at_stop_so_counters_are_trial_totals() -> None:
    scrapes = []

    def metrics(request: httpx.Request) -> httpx.Response:
        scrapes.append(request)  # every scrape moves 1 MB more than the one before
        return httpx.Response(200, text=f"orch:h2d_bytes_total {len(scrapes) * 1_000_000}\n")

    sampler = PrometheusStepSampler("http://fake/metrics", kv_bytes_per_token=1, interval_s=30.0)
    sampler._client = httpx.Client(transport=httpx.MockTransport(metrics))
    sampler.start()  # the baseline scrape, then the loop's first
    while len(scrapes) < 2:
        time.sleep(0.01)
    rows = sampler.stop()  # long before the next interval: only the final scrape follows
    assert len(scrapes) == 3 and [r["h2d_bytes_total"] for r in rows] == [1_000_000, 2_000_000]


def test_sends_follow_the_schedule_not_the_answers() -> None:
    # Every answer takes 0.5 s; a closed loop would send request i about 0.5 * i s late.
    with FakeOpenAI(first_delay_s=0.5, chunk_delay_s=0.0) as fake:
        arrivals = [0.02 * i for i in range(10)]
        records = HttpTransport(HttpTarget(fake.url, "fake")).run(
            [_spec(i, a, max_tokens=2) for i, a in enumerate(arrivals)], None
        )
    lags = [r.send_s - r.arrival_s for r in records]
    assert min(lags) >= 0 and max(lags) < 0.3, lags
    assert all(r.error is None for r in records)



class ClosingServer:
    """A keep-alive streaming server (aiohttp) that closes connections as ``mode`` says:
    ``reused_once``: the first request to arrive on a reused connection gets no answer (the
    server's keep-alive timer fired as it arrived), ``reused_once_reset`` the same with a reset;
    ``always``: no request gets an answer;
    ``mid_stream``: every answer breaks off after its first chunk; ``never``: every request is answered."""

    def __init__(self, mode: str):
        self.mode = mode
        self.posts = 0
        self.unanswered = 0
        self.url = ""
        self._requests_per_connection: dict[int, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.posts += 1
        connection = id(request.transport)
        seen = self._requests_per_connection[connection] = self._requests_per_connection.get(connection, 0) + 1
        if self.mode == "always" or (self.mode.startswith("reused_once") and seen == 2 and not self.unanswered):
            self.unanswered += 1
            if self.mode == "reused_once_reset":  # closed with a reset (RST), not an orderly close (FIN)
                request.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()
            return web.Response()  # (the connection is gone: nothing reaches the client)
        events = [f"data: {json.dumps({'choices': [{'index': 0, 'token_ids': [i]}]})}\n\n" for i in range(body["max_tokens"])]
        if self.mode == "mid_stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(events[0].encode())
            request.transport.abort()
            return response
        # The whole stream in one body: the client has read all of it at [DONE], so the
        # connection goes back to the pool for the next request (reuse is what is tested).
        return web.Response(text="".join(events) + "data: [DONE]\n\n", content_type="text/event-stream")

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def __enter__(self) -> ClosingServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        self._runner = web.AppRunner(app)
        self._thread.start()
        self._call(self._runner.setup())
        self._call(web.TCPSite(self._runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_connection_idle_longer_than_the_client_keeps_it_is_not_reused() -> None:
    # Idle 0.3 s: reused. Idle about 2.7 s (over CONNECTION_IDLE_S, under servers' 5 s): a fresh one.
    assert CONNECTION_IDLE_S < 2.7
    with ClosingServer("never") as server:
        records = HttpTransport(HttpTarget(server.url, "m")).run([_spec(0, 0.0, 3), _spec(1, 0.3, 3), _spec(2, 3.0, 3)],
                                                                  None)
    assert all(r.error is None for r in records)
    assert server.posts == 3 and sorted(server._requests_per_connection.values()) == [1, 2]


@pytest.mark.parametrize("mode", ["reused_once", "reused_once_reset"])
def test_a_request_on_a_reused_connection_closed_before_its_answer_is_sent_again(mode: str) -> None:
    with ClosingServer(mode) as server:
        # The second request leaves after the first is done: on the first one's kept-alive connection.
        first, second = HttpTransport(HttpTarget(server.url, "m")).run([_spec(0, 0.0, 3), _spec(1, 0.3, 3)], None)
    assert server.posts == 3 and server.unanswered == 1
    assert first.error is None and second.error is None
    assert first.output_token_ids == second.output_token_ids == [0, 1, 2]
    assert second.send_s >= 0.3 and second.first_token_s > second.send_s


def test_a_server_that_never_answers_fails_the_request_after_one_more_send() -> None:
    with ClosingServer("always") as server:
        (record,) = HttpTransport(HttpTarget(server.url, "m")).run([_spec(0, 0.0, 3)], None)
    assert server.posts == 2
    assert record.error is not None and "ServerDisconnectedError" in record.error and record.output_tokens == 0


def test_an_answer_broken_off_is_a_failed_request_not_sent_again() -> None:
    with ClosingServer("mid_stream") as server:
        (record,) = HttpTransport(HttpTarget(server.url, "m")).run([_spec(0, 0.0, 3)], None)
    assert server.posts == 1
    assert record.error is not None and compute_metrics([record]).failed == 1
