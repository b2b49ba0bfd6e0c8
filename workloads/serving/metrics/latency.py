"""Serving metrics, defined exactly as vLLM's ``vllm bench serve`` defines them.

docs/metrics.md states every formula and edge case; in short, for each *successful* request
(no error and at least one token received), with times measured by the client:
    TTFT  = first token time - send time
    E2EL  = last token time - send time
    TPOT  = (E2EL - TTFT) / (output_tokens - 1)      only when output_tokens > 1
    ITL   = every gap between consecutive token (chunk) times, pooled over requests
and over the benchmark duration D (load start -> last request done):
    request_throughput = completed / D
    output_throughput = sum(output_tokens of successful requests) / D
    total_token_throughput = (sum(prompt_tokens) + sum(output_tokens)) / D   (successful only)
    goodput = successful requests meeting every given SLO / D  (TPOT of 1-token outputs counts as 0)
Statistics (mean, median, std, percentiles with linear interpolation) are numpy's; an empty
sample gives 0, as vLLM reports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from workloads.serving.transports.base import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
# Percentile columns every summary carries (the schema is fixed); others go to serving_percentiles.
SUMMARY_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request latencies (seconds); ``None`` where undefined (failed, or 1-token TPOT)."""

    success: bool
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    e2el_s: float | None
    itl_s: list[float] = field(default_factory=list)


def request_succeeded(record: RequestRecord) -> bool:
    """A request counts as completed when it has no error and received a first token."""
    return record.error is None and record.send_s is not None and record.first_token_s is not None


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """TTFT, TPOT, E2EL and ITLs of one request record."""
    if not request_succeeded(record):
        return RequestMetrics(False, 0, None, None, None, [])
    times = record.token_times_s or [record.first_token_s]
    output_tokens = record.output_tokens or len(record.token_times_s) or 1
    ttft = record.first_token_s - record.send_s
    e2el = times[-1] - record.send_s
    tpot = (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    itl = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    return RequestMetrics(True, output_tokens, ttft, tpot, e2el, itl)


def benchmark_duration(records: Iterable[RequestRecord]) -> float:
    """Seconds from the load's start (t = 0) until the last request was done (finished or failed)."""
    ends = []
    for r in records:
        candidates = [r.finish_s, r.token_times_s[-1] if r.token_times_s else None, r.first_token_s, r.send_s]
        ends.append(max((t for t in candidates if t is not None), default=r.arrival_s))
    return max(ends, default=0.0)


def distribution(values: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean, median, std and the given percentiles of ``values`` (seconds), as vLLM: empty -> 0."""
    sample = np.asarray(values, dtype=float) if len(values) else np.zeros(1)
    stats = {"mean": float(np.mean(sample)), "median": float(np.median(sample)), "std": float(np.std(sample))}
    for p in percentiles:
        stats[percentile_key(p)] = float(np.percentile(sample, p))
    return stats


def percentile_key(p: float) -> str:
    """Column suffix of a percentile: 99 -> 'p99', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


@dataclass
class ServingMetrics:
    """Everything ``vllm bench serve`` reports for one run, plus per-request values."""

    per_request: list[RequestMetrics]
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None  # requests/s meeting every SLO; None when no SLO was given
    samples: dict[str, list[float]]  # metric name -> values in seconds (ITL pooled)

    def summary(self, percentiles: Iterable[float] = SUMMARY_PERCENTILES) -> dict[str, float]:
        """Flat summary: counts, throughputs, goodput and ``<metric>_ms_<stat>`` latency columns."""
        out: dict[str, float] = {
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "goodput": self.goodput,
        }
        for name in LATENCY_METRICS:
            for stat, value in distribution(self.samples[name], percentiles).items():
                out[f"{name}_ms_{stat}"] = value * 1000.0
        return out

    def percentile_rows(self, percentiles: Iterable[float]) -> list[dict[str, float | str]]:
        """Long-format rows (metric, percentile, value_ms) for any configured percentiles."""
        rows: list[dict[str, float | str]] = []
        for name in LATENCY_METRICS:
            stats = distribution(self.samples[name], percentiles)
            rows.extend(
                {"metric": name, "percentile": float(p), "value_ms": stats[percentile_key(p)] * 1000.0}
                for p in percentiles
            )
        return rows


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else math.nan


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float | None = None,
    slo_s: dict[str, float] | None = None,
) -> ServingMetrics:
    """Aggregate request records into vLLM-standard serving metrics.

    ``duration_s`` defaults to :func:`benchmark_duration`; ``slo_s`` maps any of
    ``ttft``/``tpot``/``e2el`` to a limit in seconds (a request is good when every value <= limit).
    """
    duration = benchmark_duration(records) if duration_s is None else duration_s
    per_request = [request_metrics(r) for r in records]
    ok = [(r, m) for r, m in zip(records, per_request, strict=True) if m.success]
    samples = {
        "ttft": [m.ttft_s for _, m in ok],
        "tpot": [m.tpot_s for _, m in ok if m.tpot_s is not None],
        "itl": [gap for _, m in ok for gap in m.itl_s],
        "e2el": [m.e2el_s for _, m in ok],
    }
    total_input = sum(r.prompt_tokens for r, _ in ok)
    total_output = sum(m.output_tokens for _, m in ok)

    goodput = None
    if slo_s:
        unknown = set(slo_s) - {"ttft", "tpot", "e2el"}
        if unknown:
            raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}; allowed: ttft, tpot, e2el")
        # vLLM counts the TPOT of a 1-token output as 0 when checking SLOs.
        values = {"ttft": lambda m: m.ttft_s, "tpot": lambda m: m.tpot_s or 0.0, "e2el": lambda m: m.e2el_s}
        good = sum(all(values[k](m) <= limit for k, limit in slo_s.items()) for _, m in ok)
        goodput = _rate(good, duration)

    return ServingMetrics(
        per_request=per_request,
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        duration_s=duration,
        request_throughput=_rate(len(ok), duration),
        output_throughput=_rate(total_output, duration),
        total_token_throughput=_rate(total_input + total_output, duration),
        goodput=goodput,
        samples=samples,
    )
