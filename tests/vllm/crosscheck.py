"""Cross-check helpers: replay what ``vllm bench serve`` sent through our client and compare.

Both clients run the same schedule against one server at the same time, ``RUNS`` times; counts
must match exactly in every run, and the medians of TTFT and TPOT over all runs' requests
(pooled) and the output throughput over all runs (tokens / seconds) must agree within 15%.
Both send text prompts (the server tokenizes them). Pooling is what makes a 15% bound meaningful for a tiny model whose TTFT is ~20 ms of mostly
server overhead: one run's median moves by several milliseconds with the phase of the other
work on a 2-core host, in either client's favour (docs/metrics.md has the numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from tests.vllm.bench_client import BenchLoad, VLLMBench, bench_schedule
from workloads.serving.load import build_load
from workloads.serving.metrics.latency import ServingMetrics, compute_metrics
from workloads.serving.params import LoadParams
from workloads.serving.transports.http import HttpTarget, HttpTransport

TOLERANCE = 0.15
# TPOT: each client spends its own per-chunk time (parsing, timestamps) inside every gap, a
# fixed ~0.2-0.3 ms per token; at a tiny model's 1-2 ms TPOT that alone is 15-20%
TPOT_FLOOR_MS = 0.5
RUNS = 3
COUNTS = ("completed", "failed", "total_input_tokens", "total_output_tokens")


@dataclass(frozen=True)
class Pooled:
    """One client's numbers over all joint runs."""

    ttft_ms_median: float
    tpot_ms_median: float
    output_throughput: float


def cross_check(bench: VLLMBench, base_url: str, model: str, tokenizer: str, load: BenchLoad, vocab_size: int,
                workdir: Path) -> tuple[list[tuple[ServingMetrics, dict]], dict]:
    """vLLM's client (``bench``) alone to learn its schedule, then ``RUNS`` times alongside our replay of it.

    Each of our requests is sent a quarter of a mean inter-arrival time away from its twin, so
    twins do not collide (the later twin of a collision would wait one engine step), and that
    quarter alternates, after and before the twin: the second of two nearby requests finds a
    server that was busy a moment ago, and a fixed order gave that to one client only (+19% on
    our median TTFT against ``vllm serve`` at 2 requests/s, where a server idle for longer
    answers later). Returns the joint runs [(our metrics, vLLM's results)] and vLLM's results of
    the solo run.
    """
    solo = bench.run(base_url, model, tokenizer, load)
    trace = workdir / "bench-schedule.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in bench_schedule(solo)))
    shift = 0.25 / load.request_rate
    # Prompts as text, as vLLM's random dataset sends them (decoded random ids): the server then
    # does the same work (tokenizing) for both clients' requests.
    text_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    replay = build_load(LoadParams(arrival="trace", trace=str(trace), seed=0), vocab_size, text_tokenizer)
    requests = [replace(r, arrival_s=r.arrival_s + (shift if i % 2 == 0 else -shift), prompt_token_ids=[],
                        prompt_text=text_tokenizer.decode(r.prompt_token_ids)) for i, r in enumerate(replay)]
    transport = HttpTransport(HttpTarget(base_url, model))
    runs = []
    for _ in range(RUNS):
        theirs, records = bench.run_alongside(base_url, model, tokenizer, load, lambda: transport.run(requests, None))
        runs.append((compute_metrics(records), theirs))
    return runs, solo


def pooled_ours(runs: list[tuple[ServingMetrics, dict]]) -> Pooled:
    """Our client's medians over every successful request of every run, and its throughput."""
    ttfts = [m.ttft_s for ours, _ in runs for m in ours.per_request if m.success]
    tpots = [m.tpot_s for ours, _ in runs for m in ours.per_request if m.success and m.tpot_s is not None]
    tokens = sum(ours.total_output_tokens for ours, _ in runs)
    return Pooled(1000 * float(np.median(ttfts)), 1000 * float(np.median(tpots)),
                  tokens / sum(ours.duration_s for ours, _ in runs))


def pooled_theirs(runs: list[tuple[ServingMetrics, dict]]) -> Pooled:
    """vLLM's client's medians over its detailed per-request results (TPOT as vLLM computes it)."""
    ttfts, tpots = [], []
    for _, theirs in runs:
        for ttft, latency, n_out, error in zip(theirs["ttfts"], theirs["latencies"], theirs["output_lens"],
                                               theirs["errors"], strict=True):
            if error:
                continue
            ttfts.append(ttft)
            if n_out > 1:
                tpots.append((latency - ttft) / (n_out - 1))
    tokens = sum(theirs["total_output_tokens"] for _, theirs in runs)
    return Pooled(1000 * float(np.median(ttfts)), 1000 * float(np.median(tpots)),
                  tokens / sum(theirs["duration"] for _, theirs in runs))


def verdict(runs: list[tuple[ServingMetrics, dict]], tolerance: float = TOLERANCE,
            metrics: tuple[str, ...] = ("ttft_ms_median", "tpot_ms_median", "output_throughput")) -> list[str]:
    """What disagrees: any count in any run; a pooled ``metrics`` value beyond ``tolerance``."""
    problems = []
    for i, (ours, theirs) in enumerate(runs):
        for key in COUNTS:
            if getattr(ours, key) != theirs[key]:
                problems.append(f"run {i} {key}: ours {getattr(ours, key)} vs vllm bench {theirs[key]}")
    ours, theirs = pooled_ours(runs), pooled_theirs(runs)
    for key in metrics:
        a, b = getattr(ours, key), getattr(theirs, key)
        allowed = max(tolerance * b, TPOT_FLOOR_MS if key == "tpot_ms_median" else 0.0)
        if abs(a - b) > allowed:
            problems.append(f"{key}: ours {a:.2f} vs vllm bench {b:.2f} ({(a - b) / b:+.0%})")
    return problems + [comparison_table(runs)] if problems else []


def comparison_table(runs: list[tuple[ServingMetrics, dict]]) -> str:
    """Both clients' numbers, per run and pooled (for failure messages and the docs)."""
    rows = [f"{'metric':<20}{'run':>6}{'ours':>10}{'vllm bench':>12}"]
    for i, (ours, theirs) in enumerate(runs):
        summary = ours.summary()
        for ours_key, their_key in (("ttft_ms_median", "median_ttft_ms"), ("tpot_ms_median", "median_tpot_ms"),
                                    ("output_throughput", "output_throughput")):
            rows.append(f"{ours_key:<20}{i:>6}{summary[ours_key]:>10.2f}{theirs[their_key]:>12.2f}")
    mine, theirs = pooled_ours(runs), pooled_theirs(runs)
    for key in ("ttft_ms_median", "tpot_ms_median", "output_throughput"):
        rows.append(f"{key:<20}{'all':>6}{getattr(mine, key):>10.2f}{getattr(theirs, key):>12.2f}")
    return "\n".join(rows)


def assert_client_agrees_with_vllm_bench(bench: VLLMBench, base_url: str, model: str, tokenizer: str,
                                         load: BenchLoad, vocab_size: int, tmp_path: Path) -> None:
    """Cross-check our client against ``vllm bench serve`` on one server; fail with the differences."""
    runs, solo = cross_check(bench, base_url, model, tokenizer, load, vocab_size, tmp_path)
    assert solo["completed"] == load.num_prompts
    assert all(theirs["completed"] == ours.completed == load.num_prompts for ours, theirs in runs)
    # We read vLLM's per-request results as vLLM does: one run pooled is its own median.
    for run in runs:
        theirs = pooled_theirs([run])
        assert abs(theirs.ttft_ms_median - run[1]["median_ttft_ms"]) < 1e-6
        assert abs(theirs.tpot_ms_median - run[1]["median_tpot_ms"]) < 1e-6
    print(comparison_table(runs))  # shown with -s, and in docs/metrics.md
    problems = verdict(runs)
    assert not problems, "\n".join(problems)
