"""The transports are open loop: a slow system never delays a send."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.serving.fakes import SlowEngine
from workloads.serving.metrics.latency import compute_metrics
from workloads.serving.transports.base import RequestSpec
from workloads.serving.transports.engine_inprocess import InProcessTransport
from workloads.serving.transports.open_loop import run_open_loop


def _load(n: int, gap_s: float, max_tokens: int = 3) -> list[RequestSpec]:
    return [RequestSpec(f"r{i}", i * gap_s, [1, 2, 3], max_tokens) for i in range(n)]


def test_sends_happen_on_schedule_while_steps_are_slow() -> None:
    # Steps take 400 ms; requests arrive every 40 ms: a closed loop would send up to a step late.
    transport = InProcessTransport(SlowEngine(step_s=0.4))
    records = transport.run(_load(10, 0.04), max_concurrency=None)
    lags = [r.send_s - r.arrival_s for r in records]
    assert min(lags) >= 0
    # Bounds far below a step, with room for thread wake-ups on a busy machine.
    assert max(lags) < 0.15 and sum(lags) / len(lags) < 0.05, lags
    # The wait for the step boundary is queueing inside the server: it shows up in TTFT.
    assert max(r.first_token_s - r.send_s for r in records) > 0.3
    assert all(r.error is None and r.output_tokens == 3 for r in records)
    # Every token gets its own timestamp, one step apart.
    for r in records:
        gaps = [b - a for a, b in zip(r.token_times_s, r.token_times_s[1:], strict=False)]
        assert all(g == pytest.approx(0.4, abs=0.1) for g in gaps)


def test_max_concurrency_caps_requests_in_flight() -> None:
    transport = InProcessTransport(SlowEngine(step_s=0.02))
    records = transport.run(_load(6, 0.0, max_tokens=2), max_concurrency=2)
    events = sorted([(r.send_s, 1) for r in records] + [(r.finish_s, -1) for r in records])
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    assert peak == 2
    # The third request waits for a free slot: it is sent only after one of the first two finished.
    first_done = min(r.finish_s for r in records[:2])
    assert records[2].send_s >= first_done


def test_idle_engine_waits_for_the_next_arrival_and_steps_are_sampled() -> None:
    transport = InProcessTransport(SlowEngine(step_s=0.01))
    records = transport.run([RequestSpec("a", 0.0, [1], 2), RequestSpec("b", 0.3, [1], 2)], None)
    assert records[1].send_s == pytest.approx(0.3, abs=0.1)
    assert records[1].send_s >= 0.3
    steps = transport.engine_steps()
    assert len(steps) == 4  # two steps per request, none while idle
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert all(s["h2d_bytes"] == 100 for s in steps)
    assert steps[-1]["h2d_bytes_total"] == 400
    assert steps[0]["running"] == 1 and steps[0]["kv_bytes_device"] == 1000


def test_engine_error_becomes_a_failed_record_not_a_crash() -> None:
    transport = InProcessTransport(SlowEngine(step_s=0.01, max_len=2))
    records = transport.run([RequestSpec("long", 0.0, [1, 2, 3], 4), RequestSpec("ok", 0.0, [1], 2)], None)
    assert records[0].error == "prompt longer than max_model_len" and records[0].output_tokens == 0
    m = compute_metrics(records)
    assert (m.completed, m.failed) == (1, 1)


def test_a_request_that_fails_late_ends_the_benchmark_when_its_error_arrives() -> None:
    # The asyncio transports' core: one request streams a token at once, the other fails after
    # 300 ms. The duration (every throughput's denominator) runs until that failure, as vLLM's.
    async def send(spec: RequestSpec, t0: float, record) -> None:
        record.send_s = time.perf_counter() - t0
        if spec.request_id == "bad":
            await asyncio.sleep(0.3)
            raise ConnectionError("server went away")
        record.add_arrival(time.perf_counter() - t0, [7])
        record.output_tokens = 1

    records = asyncio.run(run_open_loop(_load(2, 0.0)[:1] + [RequestSpec("bad", 0.0, [1], 3)], None, send))
    assert records[1].error == "ConnectionError: server went away"
    assert records[1].finish_s >= 0.3
    m = compute_metrics(records)
    assert (m.completed, m.failed) == (1, 1)
    assert m.duration_s == pytest.approx(records[1].finish_s)
    assert m.request_throughput < 1 / 0.3
