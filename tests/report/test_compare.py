"""`orch compare`: relative change, the repeats' spread, exit codes for CI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.report.compare import CompareError, compare
from orchestrator.report.data import load_experiment
from tests.report.synthetic import serving_experiment, training_experiment


def _run(*args: str):
    return CliRunner().invoke(main, ["compare", *args])


def test_differences_and_spread(tmp_path: Path) -> None:
    a = load_experiment(serving_experiment(tmp_path, "a"))
    b = load_experiment(serving_experiment(tmp_path, "b", slowdown=1.5))
    result = compare(a, b, ["ttft_ms_p50", "output_throughput"], threshold=0.1)
    assert result.keys == ["backend", "request_rate"] and len(result.differences) == 12
    ttft = next(d for d in result.differences if d.metric == "ttft_ms_p50" and d.config == {"backend": "full", "request_rate": 4.0})
    assert (ttft.a_mean, ttft.b_mean, ttft.a_n) == (pytest.approx(40.0), pytest.approx(60.0), 2)
    assert ttft.relative == pytest.approx(0.5) and ttft.beyond_spread is True and ttft.regressed
    tput = next(d for d in result.differences if d.metric == "output_throughput")
    assert tput.relative == pytest.approx(-1 / 3) and tput.regressed  # higher is better: a drop regresses
    # Within the repeats' spread: a 1% TTFT change with +-1 ms repeats is noise, even at threshold 0.
    c = load_experiment(serving_experiment(tmp_path, "c", slowdown=1.01))
    noise = compare(a, c, ["ttft_ms_p50"], threshold=0.0)
    assert all(d.beyond_spread is False and not d.regressed for d in noise.differences)
    # An improvement is not a regression.
    assert not compare(b, a, ["ttft_ms_p50"], threshold=0.1).regressions()


def test_cli_exit_codes(tmp_path: Path) -> None:
    serving_experiment(tmp_path, "a")
    serving_experiment(tmp_path, "b", slowdown=1.5)
    slower = _run("a", "b", "--results", str(tmp_path), "--metric", "ttft_ms_p99", "--threshold", "0.2")
    assert slower.exit_code == 1 and "regressed" in slower.output and "+50.0%" in slower.output
    assert _run("a", "b", "--results", str(tmp_path), "--metric", "ttft_ms_p99", "--threshold", "0.6").exit_code == 0
    assert _run("b", "a", "--results", str(tmp_path), "--metric", "ttft_ms_p99").exit_code == 0
    unknown = _run("a", "b", "--results", str(tmp_path), "--metric", "nope")
    assert unknown.exit_code == 2 and "unknown metric(s) nope" in unknown.output and "Traceback" not in unknown.output


def test_a_worsening_from_zero_regresses(tmp_path: Path) -> None:
    a = load_experiment(serving_experiment(tmp_path, "a"))
    b = load_experiment(serving_experiment(tmp_path, "b", failed=2))
    (first, *_) = failures = compare(a, b, ["failed"]).differences
    assert all(d.regressed and d.relative == math.inf for d in failures) and first.a_mean == 0
    assert not compare(a, a, ["failed"]).regressions()
    cli = _run("a", "b", "--results", str(tmp_path), "--metric", "failed")
    assert cli.exit_code == 1 and "+inf%" in cli.output


def test_a_metric_missing_in_some_repeats_of_b_regresses(tmp_path: Path) -> None:
    a = load_experiment(serving_experiment(tmp_path, "a"))
    b = load_experiment(serving_experiment(tmp_path, "b", no_p99=frozenset({("full", 1.0, 1)})))
    (missing,) = [d for d in compare(a, b, ["ttft_ms_p99"]).differences if d.regressed]
    # not the mean of the repeat that has it (which equals A's)
    assert missing.config == {"backend": "full", "request_rate": 1.0} and math.isnan(missing.b_mean)
    assert _run("a", "b", "--results", str(tmp_path), "--metric", "ttft_ms_p99").exit_code == 1


def test_an_axis_the_other_experiment_held_fixed_is_matched_on_its_value(tmp_path: Path) -> None:
    # A varied the rate; B ran rate 1 only (its base), 30% slower: only A's rate-1 trials compare.
    a = load_experiment(serving_experiment(tmp_path, "a"))
    b = load_experiment(serving_experiment(tmp_path, "b", slowdown=1.3, rates=(1.0,)))
    assert b.axes == ["backend"]
    result = compare(a, b, ["ttft_ms_p50"])
    assert result.keys == ["backend", "request_rate"] and (result.only_a, result.only_b) == (4, 0)
    assert {d.config["request_rate"] for d in result.differences} == {1.0}
    assert all(d.a_n == d.b_n == 2 and d.relative == pytest.approx(0.3) for d in result.differences)


def test_nothing_shared_is_a_clear_error(tmp_path: Path) -> None:
    a = load_experiment(serving_experiment(tmp_path, "a"))
    t = load_experiment(training_experiment(tmp_path, "t"))
    with pytest.raises(CompareError, match="no summary table in common"):
        compare(a, t)


def test_resubmitted_experiments_compare_per_configuration(tmp_path: Path) -> None:
    """Experiments with two submissions of other axes: matched on every axis either submission varied."""
    from tests.report.synthetic import resubmitted_serving_experiment

    a = load_experiment(resubmitted_serving_experiment(tmp_path, "a"))
    b = load_experiment(resubmitted_serving_experiment(tmp_path, "b"))
    result = compare(a, b, ["ttft_ms_p50"])
    assert result.keys == ["backend", "request_rate", "model", "prompt_source"]
    # 6 configurations of the first grid (its base model, no prompt_source), 4 of the second (its base backend, rate).
    assert len(result.differences) == 10 and result.only_a == result.only_b == 0
    assert sorted(d.a_n for d in result.differences) == [1] * 4 + [2] * 6
    assert {"backend": "h2o", "request_rate": 4.0, "model": "tiny", "prompt_source": None} in [d.config for d in result.differences]
    # Against an experiment of the first grid only: its 12 trials match the first submission's, never the second's.
    c = load_experiment(serving_experiment(tmp_path, "c", slowdown=1.5))
    against = compare(a, c, ["ttft_ms_p50"])
    assert against.keys == ["backend", "request_rate", "model", "prompt_source"] and len(against.differences) == 6
    assert all(d.a_n == d.b_n == 2 and d.relative == pytest.approx(0.5) for d in against.differences)
    cli = _run("a", "b", "--results", str(tmp_path), "--metric", "ttft_ms_p50")
    assert cli.exit_code == 0 and "Traceback" not in cli.output and "10 shared configuration(s)" in cli.output
