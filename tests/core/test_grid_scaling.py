"""benchmarks/bench_grid_scaling.py in its reduced form: one grid on 1 and 2 CPU slots of a fresh Ray each."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_grid_scaling import ScalingRun, measure, peak_concurrency, speedups, table
from orchestrator.manifest import Manifest
from orchestrator.store import ExperimentStore

TRIALS, SLEEP_S = 8, 0.4


def test_peak_concurrency_counts_overlaps_only() -> None:
    assert peak_concurrency([]) == 0
    assert peak_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # back to back is one at a time
    assert peak_concurrency([(0, 4), (1, 2), (1.5, 3), (3.5, 5)]) == 3


def test_ratios_are_against_the_first_run() -> None:
    one = ScalingRun(slots=1, trials=16, done=16, wall_s=160.0, busy_s=150.0, peak_running=1)
    two = ScalingRun(slots=2, trials=16, done=16, wall_s=100.0, busy_s=150.0, peak_running=2)
    (_, s1, r1), (_, s2, r2) = speedups([one, two])
    assert (s1, r1) == (1.0, 1.0)
    assert s2 == pytest.approx(1.6) and r2 == pytest.approx(0.8)
    assert two.utilisation == pytest.approx(0.75)
    assert table([one, two])[-1] == "lowest ratio to linear 0.80 (goal >= 0.9x: MISSED)"


@pytest.mark.slow
def test_one_grid_on_one_and_two_slots_measures_real_runs(tmp_path: Path) -> None:
    grid = {"experiment": "scale", "kind": "tests.support.kinds:ToyKind", "base": {"steps": 1, "sleep_s": SLEEP_S},
            "grid": {"x": list(range(TRIALS))}, "resources": {"num_cpus": 1}}
    one, two = measure(grid, [1, 2], "cpu", tmp_path)
    for run, slots in ((one, 1), (two, 2)):
        assert (run.slots, run.trials, run.done) == (slots, TRIALS, TRIALS)
        manifest = Manifest.load(ExperimentStore(tmp_path, f"scale-{slots}cpu"))
        assert manifest is not None and {e["state"] for e in manifest.trials.values()} == {"done"}
        assert run.busy_s >= TRIALS * SLEEP_S
        # No faster than `slots` sleeping trials at a time allow: Ray offered exactly that many slots.
        assert run.wall_s >= TRIALS * SLEEP_S / slots
    assert one.peak_running == 1 and two.peak_running <= 2
    ratio = speedups([one, two])[1][2]
    assert ratio == pytest.approx(two.trials_per_hour / (2 * one.trials_per_hour))
    assert f"lowest ratio to linear {ratio:.2f}" in table([one, two])[-1]
