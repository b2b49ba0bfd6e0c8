"""Cross-check helpers: replay what ``vllm bench serve`` sent through our client and compare."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from backends.kvcache.vllm.bench_client import (
    BenchLoad,
    bench_schedule,
    run_vllm_bench,
    run_vllm_bench_alongside,
)
from workloads.serving.http_transport import HttpTarget, HttpTransport
from workloads.serving.load import build_load
from workloads.serving.metrics import ServingMetrics, compute_metrics
from workloads.serving.params import LoadParams

TOLERANCE = 0.15
# Added to the TTFT tolerance: a tiny model's TTFT is tens of milliseconds, mostly server overhead,
# and one scheduling hiccup of a busy 2-core host moves its median by ~20 ms (docs/metrics.md).
TTFT_SLACK_MS = 25.0
# (our summary column, vllm bench result key)
COMPARED = (
    ("ttft_ms_median", "median_ttft_ms"),
    ("tpot_ms_median", "median_tpot_ms"),
    ("output_throughput", "output_throughput"),
)


ATTEMPTS = 3


def cross_check(base_url: str, model: str, tokenizer: str, load: BenchLoad, vocab_size: int,
                workdir: Path) -> tuple[list[tuple[ServingMetrics, dict]], dict]:
    """vLLM's client alone (to learn its schedule), then again alongside our replay of that schedule.

    Our copy of the schedule runs half a mean inter-arrival time behind vLLM's, so twin requests
    do not collide (the later twin of a collision would wait one engine step, a bias against
    whichever client is a few milliseconds late to start). On a busy host a joint run can still
    catch a burst of other work (TTFTs of a tiny model are tens of milliseconds), so it is
    repeated, up to ``ATTEMPTS`` times, until the two clients agree. Returns the joint runs
    [(our metrics, vLLM's results)] and vLLM's results of the solo run.
    """
    solo = run_vllm_bench(base_url, model, tokenizer, load)
    trace = workdir / "bench-schedule.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in bench_schedule(solo)))
    shift = 0.5 / load.request_rate
    requests = [replace(r, arrival_s=r.arrival_s + shift)
                for r in build_load(LoadParams(arrival="trace", trace=str(trace), seed=0), vocab_size)]
    transport = HttpTransport(HttpTarget(base_url, model))
    attempts = []
    for _ in range(ATTEMPTS):
        joint, records = run_vllm_bench_alongside(
            base_url, model, tokenizer, load, lambda: transport.run(requests, None)
        )
        attempts.append((compute_metrics(records), joint))
        if not disagreements(*attempts[-1]):
            break
    return attempts, solo


def verdict(attempts: list[tuple[ServingMetrics, dict]]) -> list[str]:
    """Problems across the joint runs: any count mismatch in any run, and any compared metric
    that was outside the tolerance in every run (one run within it is agreement)."""
    per_run = [disagreements(ours, theirs) for ours, theirs in attempts]
    counts = [p for problems in per_run for p in problems if not p.split(":")[0].endswith(("_ms_median", "throughput"))]
    metrics = {p.split(":")[0] for p in per_run[0] if p.split(":")[0].endswith(("_ms_median", "throughput"))}
    always = {m for m in metrics if all(any(p.startswith(m + ":") for p in problems) for problems in per_run)}
    tables = "\n".join(comparison_table(ours, theirs) for ours, theirs in attempts)
    failures = counts + [p for p in per_run[-1] if p.split(":")[0] in always]
    return failures + [tables] if failures else []


def disagreements(ours: ServingMetrics, theirs: dict, tolerance: float = TOLERANCE) -> list[str]:
    """What differs: counts exactly, the compared medians and throughput beyond ``tolerance``."""
    problems = []
    for ours_value, their_key in (
        (ours.completed, "completed"),
        (ours.failed, "failed"),
        (ours.total_input_tokens, "total_input_tokens"),
        (ours.total_output_tokens, "total_output_tokens"),
    ):
        if ours_value != theirs[their_key]:
            problems.append(f"{their_key}: ours {ours_value} vs vllm bench {theirs[their_key]}")
    summary = ours.summary()
    for ours_key, their_key in COMPARED:
        a, b = summary[ours_key], theirs[their_key]
        slack = TTFT_SLACK_MS if ours_key.startswith("ttft") else 0.0
        if abs(a - b) > tolerance * b + slack:
            problems.append(f"{ours_key}: ours {a:.2f} vs vllm bench {their_key} {b:.2f} ({(a - b) / b:+.0%})")
    return problems


def comparison_table(ours: ServingMetrics, theirs: dict) -> str:
    """A small text table of both clients' numbers (for failure messages and the docs)."""
    summary = ours.summary()
    rows = [f"{'metric':<22}{'ours':>12}{'vllm bench':>12}"]
    for ours_key, their_key in (*COMPARED, ("e2el_ms_median", "median_e2el_ms"), ("itl_ms_median", "median_itl_ms")):
        rows.append(f"{ours_key:<22}{summary[ours_key]:>12.2f}{theirs[their_key]:>12.2f}")
    return "\n".join(rows)
