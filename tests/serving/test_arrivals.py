"""Arrival processes: rates, burstiness, determinism, trace replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workloads.serving.load import build_load
from workloads.serving.load.arrivals import arrival_times
from workloads.serving.load.trace import read_trace
from workloads.serving.params import LoadParams

N = 20_000


def _gaps(name: str, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_times(name, N, rate, burstiness, np.random.default_rng(seed)))


@pytest.mark.parametrize("name", ["poisson", "gamma", "constant"])
@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_mean_gap_is_one_over_rate(name: str, rate: float) -> None:
    gaps = _gaps(name, rate)
    # The mean of 20k exponential gaps is within 3% of 1/rate with overwhelming probability (sd 0.7%).
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)


def test_schedule_is_vllms_first_request_after_a_gap_last_at_n_over_rate() -> None:
    for name in ("poisson", "gamma", "constant"):
        for seed in range(5):
            times = arrival_times(name, 100, 3.0, 0.5, np.random.default_rng(seed))
            assert len(times) == 100 and times[0] > 0.0
            assert np.all(np.diff(times) >= 0)
            # the offered load is the nominal rate for every seed, as vLLM scales its schedule
            assert times[-1] == pytest.approx(100 / 3.0, rel=1e-12)


def test_poisson_gaps_are_exponential() -> None:
    gaps = _gaps("poisson", 2.0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # CV of an exponential is 1
    # P(gap > mean) = e^-1 for an exponential.
    assert np.mean(gaps > gaps.mean()) == pytest.approx(np.exp(-1), abs=0.015)
    # Counts in unit windows of a Poisson process: variance == mean.
    counts = np.bincount(np.floor(np.cumsum(gaps)).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness: float) -> None:
    gaps = _gaps("gamma", 5.0, burstiness)
    assert gaps.mean() == pytest.approx(0.2, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_gamma_with_burstiness_one_is_poisson_in_distribution() -> None:
    for gaps in (_gaps("gamma", 3.0, 1.0), _gaps("poisson", 3.0, seed=1)):
        for q in (10, 50, 90):
            exponential_quantile = -np.log(1 - q / 100) / 3.0
            # Sample-quantile sd is <= 2.2% of the value here; 10% is > 4 sd.
            assert np.percentile(gaps, q) == pytest.approx(exponential_quantile, rel=0.1)


def test_constant_is_evenly_spaced_and_infinite_rate_sends_at_once() -> None:
    assert np.allclose(arrival_times("constant", 5, 2.0, 1.0, np.random.default_rng(0)), [0.5, 1, 1.5, 2, 2.5])
    for name in ("poisson", "gamma", "constant"):
        assert np.all(arrival_times(name, 7, float("inf"), 1.0, np.random.default_rng(0)) == 0)


def test_same_seed_same_load_other_seed_other_load() -> None:
    params = LoadParams(arrival="gamma", request_rate=3, burstiness=0.5, num_requests=50,
                        input_dist="lognormal", input_spread=0.5, seed=7)
    a, b = build_load(params, 1000), build_load(params, 1000)
    assert a == b
    c = build_load(params.model_copy(update={"seed": 8}), 1000)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]


def test_changing_output_lengths_leaves_arrivals_and_prompts_alone() -> None:
    base = LoadParams(request_rate=3, num_requests=30, seed=3)
    other = base.model_copy(update={"output_dist": "uniform", "output_spread": 0.5})
    a, b = build_load(base, 500), build_load(other, 500)
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.max_tokens for r in a] != [r.max_tokens for r in b]


def test_unknown_process_is_rejected() -> None:
    with pytest.raises(ValueError, match="allowed: poisson, gamma, constant"):
        arrival_times("bursty", 3, 1.0, 1.0, np.random.default_rng(0))


def test_trace_replay(tmp_path) -> None:
    lines = [
        {"arrival_s": 10.5, "input_len": 7, "output_len": 3},
        {"timestamp": 10.0, "input_len": 5, "output_len": 2},
        {"arrival_s": 12.0, "prompt_token_ids": [4, 5, 6], "output_len": 1},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    entries = read_trace(path)
    assert [e.arrival_s for e in entries] == [0.0, 0.5, 2.0]

    load = build_load(LoadParams(arrival="trace", trace=str(path), seed=1), vocab_size=100)
    assert [r.arrival_s for r in load] == [0.0, 0.5, 2.0]
    assert [len(r.prompt_token_ids) for r in load] == [5, 7, 3]
    assert [r.max_tokens for r in load] == [2, 3, 1]
    assert load[2].prompt_token_ids == [4, 5, 6]
    assert all(0 <= t < 100 for r in load for t in r.prompt_token_ids)
    # num_requests truncates a trace.
    assert len(build_load(LoadParams(arrival="trace", trace=str(path), num_requests=2), 100)) == 2


def test_trace_errors_name_the_problem(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_len": 3, "output_len": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs 'arrival_s'"):
        read_trace(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="needs load.trace"):
        LoadParams(arrival="trace")
