"""The A2SGD reproduction's tables (benchmarks/a2sgd_table.py) from a small synthetic result set."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.a2sgd_table import render
from tests.report.synthetic import network_training_experiment


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]


def test_the_tables_give_times_spreads_speedups_and_bytes(tmp_path: Path) -> None:
    network_training_experiment(tmp_path)
    rows = _rows(render(tmp_path, "a2sgd-network"))
    times = {r[0]: r[1:] for r in rows if r[0].startswith("bandwidth_gbit=") and len(r) == 5}
    # dense at 0.1 Gb/s: 40 and 50 s, the third repeat never reached the target.
    assert times["bandwidth_gbit=0.1"] == ["45.0 +- 7.1 (2/3)", "30.0 +- 0.0 (3/3)", "200.0 +- 40.0 (3/3)",
                                           "10.0 +- 2.0 (3/3)"]
    assert times["bandwidth_gbit=1"][0] == "15.8 +- 3.2 (3/3)"
    speedups = {(r[0], r[1]): r[2:] for r in rows if r[1] in ("topk", "qsgd") and len(r) == 4}
    # topk 30 s against a2sgd 8/10/12 s: 3.75, 3.0, 2.5 per repeat; 30 / 10 for the means.
    assert speedups[("bandwidth_gbit=0.1", "topk")] == ["3.00 (2.50-3.75)", "3.2x"]
    assert speedups[("bandwidth_gbit=1", "qsgd")] == ["20.00 (20.00-20.00)", "23.2x"]
    bytes_rows = {(r[0], r[1]): r[2:] for r in rows if len(r) == 7}
    assert bytes_rows[("bandwidth_gbit=0.1", "a2sgd")] == ["8", "800", "100.0", "0.110", "0.0300"]
    assert bytes_rows[("bandwidth_gbit=1", "dense")][:3] == ["1,000", "1,050", "1.1"]
    split = {(r[0], r[1]): r[2:] for r in rows if len(r) == 8}
    # step_time_s 0.10/0.11/0.12 s over repeats; comm 20/40/60 ms at 0.1 Gb/s, 2/4/6 at 1 Gb/s; no compress_s.
    assert split[("bandwidth_gbit=0.1", "qsgd")] == ["110.00", "60.00", "-", "40.00", "-", "-"]
    assert split[("bandwidth_gbit=1", "a2sgd")][:4] == ["110.00", "60.00", "-", "4.00"]


def test_an_empty_results_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no finished training trials"):
        render(tmp_path, "a2sgd-network")


def test_a_speedup_compares_only_repeats_in_which_both_reached_the_target() -> None:
    import pandas as pd

    from benchmarks.a2sgd_table import speedups

    group = pd.DataFrame({"compressor": ["a2sgd"] * 3 + ["topk"] * 3, "repeat": [0, 1, 2] * 2,
                          "time_to_target_s": [10.0, 10.0, 20.0, 20.0, 40.0, None]})
    # topk never reached it in repeat 2: against a2sgd's mean over all three (13.3 s) its 30 s would read 2.25
    assert speedups(group, "topk") == (3.0, 2.0, 4.0, 2, 3)
    group.loc[group.compressor == "topk", "time_to_target_s"] = None
    assert speedups(group, "topk") == (None, None, None, 0, 3)
