"""Metric definitions on hand-made request records (exact values, vLLM's definitions)."""

from __future__ import annotations

import pytest

from workloads.serving.metrics.latency import benchmark_duration, compute_metrics, request_metrics
from workloads.serving.transports.base import RequestRecord


def _record(rid, send, tokens, prompt, error=None, finish=None) -> RequestRecord:
    return RequestRecord(
        request_id=rid, arrival_s=send, send_s=send,
        first_token_s=tokens[0] if tokens else None,
        finish_s=finish if finish is not None else (tokens[-1] if tokens else None),
        token_times_s=list(tokens), output_token_ids=list(range(len(tokens))),
        prompt_tokens=prompt, output_tokens=len(tokens), error=error,
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        _record("a", 1.0, [1.5, 1.7, 2.0, 2.4], prompt=10),  # ttft .5, e2el 1.4, tpot .3, itl .2 .3 .4
        _record("b", 2.0, [2.25], prompt=20),  # one token: ttft = e2el = .25, no TPOT, no ITL
        _record("c", 3.0, [], prompt=30, error="boom", finish=3.5),  # failed, last event of the run
        _record("d", 0.5, [0.6, 1.0], prompt=5),  # ttft .1, e2el .5, tpot .4, itl .4
    ]


def test_per_request_values(records) -> None:
    a = request_metrics(records[0])
    assert (a.ttft_s, a.e2el_s, a.tpot_s) == pytest.approx((0.5, 1.4, 0.3))
    assert a.itl_s == pytest.approx([0.2, 0.3, 0.4])
    b = request_metrics(records[1])
    assert (b.ttft_s, b.e2el_s, b.tpot_s, b.itl_s) == (0.25, 0.25, None, [])
    c = request_metrics(records[2])
    assert not c.success and c.ttft_s is None and c.output_tokens == 0


def test_counts_duration_and_throughputs(records) -> None:
    m = compute_metrics(records)
    assert (m.completed, m.failed) == (3, 1)
    assert m.duration_s == 3.5  # load start -> last request done (the failed one)
    assert (m.total_input_tokens, m.total_output_tokens) == (35, 7)  # successful requests only
    assert m.request_throughput == pytest.approx(3 / 3.5)
    assert m.output_throughput == pytest.approx(7 / 3.5)
    assert m.total_token_throughput == pytest.approx(42 / 3.5)
    assert m.goodput is None  # no SLO given


def test_latency_statistics(records) -> None:
    s = compute_metrics(records).summary()
    assert s["ttft_ms_mean"] == pytest.approx((500 + 250 + 100) / 3)
    assert s["ttft_ms_median"] == pytest.approx(250)
    assert s["tpot_ms_mean"] == pytest.approx(350)  # 1-token output excluded from TPOT
    assert s["itl_ms_mean"] == pytest.approx(325)  # pooled gaps .2 .3 .4 .4
    assert s["itl_ms_median"] == pytest.approx(350)
    assert s["itl_ms_p90"] == pytest.approx(400)  # linear interpolation between sorted gaps
    assert s["e2el_ms_mean"] == pytest.approx((1400 + 250 + 500) / 3)
    assert s["e2el_ms_p99"] == pytest.approx(500 + (1400 - 500) * 0.98)  # rank .99 * 2 = 1.98 in .25 .5 1.4
    assert s["ttft_ms_std"] == pytest.approx(1000 * ((0.5**2 + 0.25**2 + 0.1**2) / 3 - (0.85 / 3) ** 2) ** 0.5)


def test_goodput_counts_requests_meeting_every_slo(records) -> None:
    # a fails TTFT; b passes (TPOT of a 1-token output counts as 0); d fails TPOT.
    m = compute_metrics(records, slo_s={"ttft": 0.3, "tpot": 0.35})
    assert m.goodput == pytest.approx(1 / 3.5)
    # Limits are inclusive: d's E2EL of exactly .5 s meets a .5 s SLO.
    assert compute_metrics(records, slo_s={"e2el": 0.5}).goodput == pytest.approx(2 / 3.5)
    with pytest.raises(ValueError, match="allowed: ttft, tpot, e2el"):
        compute_metrics(records, slo_s={"itl": 1.0})


def test_configured_percentiles_rows(records) -> None:
    rows = compute_metrics(records).percentile_rows([25, 99.9])
    assert {(r["metric"], r["percentile"]) for r in rows} == {
        (m, p) for m in ("ttft", "tpot", "itl", "e2el") for p in (25.0, 99.9)
    }
    ttft25 = next(r for r in rows if r["metric"] == "ttft" and r["percentile"] == 25.0)
    assert ttft25["value_ms"] == pytest.approx(175)  # sorted .1 .25 .5 -> .1 + .5*(.25-.1)


def test_request_with_error_after_tokens_is_failed_and_its_tokens_not_counted() -> None:
    rec = _record("x", 0.0, [0.1, 0.2], prompt=4, error="preempted and dropped")
    m = compute_metrics([rec, _record("y", 0.0, [0.3], prompt=6)])
    assert (m.completed, m.failed, m.total_output_tokens, m.total_input_tokens) == (1, 1, 1, 6)


def test_everything_failed_reports_zero_latencies_like_vllm() -> None:
    m = compute_metrics([_record("z", 0.0, [], prompt=3, error="too long", finish=0.2)])
    assert (m.completed, m.failed, m.duration_s, m.request_throughput) == (0, 1, 0.2, 0.0)
    assert m.summary()["ttft_ms_mean"] == 0.0 and m.summary()["itl_ms_p99"] == 0.0


def test_duration_falls_back_to_the_latest_event() -> None:
    pending = RequestRecord("p", arrival_s=4.0)  # never sent
    assert benchmark_duration([pending, _record("q", 1.0, [1.5, 2.5], prompt=1)]) == 4.0
    assert compute_metrics([]).duration_s == 0.0
