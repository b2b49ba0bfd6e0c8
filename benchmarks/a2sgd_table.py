"""The A2SGD reproduction's tables, from a finished run of ``grids/a2sgd-network.yaml``.

Reads the experiment's ``train_summary`` (Parquet, through the store) and prints markdown:
1. time to the target validation perplexity (rank 0's model) per compressor and network:
   mean +- standard deviation over the repeats that reached it, and how many did;
2. A2SGD's speed-up over Top-K and over QSGD per network (t_other / t_a2sgd: the paper's 3.2x
   and 23.2x are this quantity): the ratio of the means, and its range over repeats paired by
   repeat index;
3. bytes per worker and step, payload (what the compressor hands to the collective) and wire
   (interface counters), median step time, and the final replica divergence (max over repeats);
4. the step split: median milliseconds of a step and of its compute, compress, communicate,
   decompress and optimizer parts (mean over repeats of each trial's medians over ranks and steps).
The grouping ("network") is every varying axis but the compressor: ``network.bandwidth_gbit`` for
``grids/a2sgd-network.yaml``, ``interconnect`` for ``grids/a2sgd-multigpu.yaml``.
Not a ``bench_*`` module: ``python -m benchmarks`` does not run it; it needs a run's results:

    .venv/bin/python -m benchmarks.a2sgd_table --results results [--experiment a2sgd-network]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from orchestrator.report.data import load_experiment
from orchestrator.store import ExperimentStore

PAPER_SPEEDUP = {"topk": 3.2, "qsgd": 23.2}  # arXiv 2006.07405, LSTM on PTB
BASELINE = "a2sgd"


def load_summary(results: Path, experiment: str) -> tuple[pd.DataFrame, list[str]]:
    """The done trials' train_summary rows and the network axes (varying axes other than the compressor)."""
    data = load_experiment(ExperimentStore(results, experiment))
    summary = data.table("train_summary")
    if summary is None:
        raise ValueError(f"no finished training trials in {results}/{experiment}")
    axes = [a for a in data.varying if a != "compressor"]
    return summary, axes


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _network(key: tuple, axes: list[str]) -> str:
    return ", ".join(f"{a}={v:g}" if isinstance(v, float) else f"{a}={v}" for a, v in zip(axes, key, strict=True)) or "-"


def _groups(summary: pd.DataFrame, axes: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    if not axes:
        return [((), summary)]
    return [((k,) if not isinstance(k, tuple) else k, g) for k, g in summary.groupby(axes, sort=True)]


def time_to_target_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Markdown: time to target per network (rows) and compressor (columns)."""
    compressors = list(dict.fromkeys(summary["compressor"]))
    lines = [f"| network | {' | '.join(compressors)} |", f"|---|{'---|' * len(compressors)}"]
    for key, group in _groups(summary, axes):
        cells = []
        for name in compressors:
            times = group.loc[group["compressor"] == name, "time_to_target_s"]
            reached = times.dropna()
            spread = f" +- {_fmt(reached.std(), 1)}" if len(reached) > 1 else ""
            mean = _fmt(reached.mean(), 1) if len(reached) else "not reached"
            cells.append(f"{mean}{spread} ({len(reached)}/{len(times)})")
        lines.append(f"| {_network(key, axes)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def speedups(group: pd.DataFrame, other: str) -> tuple[float | None, float | None, float | None, int, int]:
    """(ratio of mean times, min, max, repeats compared, repeats run) of t_other / t_a2sgd, over the
    repeats (paired by index) in which both reached the target: a mean over the repeats that
    reached it alone would flatter the one that missed it."""
    def times(name: str) -> pd.Series:
        return group[group["compressor"] == name].set_index("repeat")["time_to_target_s"]

    base, rival = times(BASELINE), times(other)
    both = pd.concat([base.rename("base"), rival.rename("rival")], axis=1)
    run = len(both)
    both = both.dropna()
    if both.empty:
        return None, None, None, 0, run
    paired = both["rival"] / both["base"]
    return (float(both["rival"].mean() / both["base"].mean()), float(paired.min()), float(paired.max()),
            len(both), run)


def speedup_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Markdown: A2SGD's speed-up over Top-K and QSGD per network, next to the paper's."""
    lines = ["| network | vs | t_other / t_a2sgd (repeat range) | paper |", "|---|---|---|---|"]
    for key, group in _groups(summary, axes):
        for other, paper in PAPER_SPEEDUP.items():
            ratio, low, high, compared, run = speedups(group, other)
            spread = f" ({_fmt(low, 2)}-{_fmt(high, 2)})" if low is not None else ""
            if compared < run:
                spread += f" [{compared} of {run} repeats: both reached the target]"
            lines.append(f"| {_network(key, axes)} | {other} | {_fmt(ratio, 2)}{spread} | {paper}x |")
    return "\n".join(lines)


def bytes_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Markdown: payload and wire bytes per worker and step, step time, divergence."""
    lines = ["| network | compressor | payload B/step | wire B/step | wire / payload | step s (median) | "
             "final divergence (max) |", "|---|---|---|---|---|---|---|"]
    for key, group in _groups(summary, axes):
        for name, rows in group.groupby("compressor", sort=False):
            payload = rows["payload_bytes_per_worker_step"].mean()
            wire = rows["wire_bytes_per_worker_step"].mean()
            ratio = wire / payload if payload and not math.isnan(wire) else None
            lines.append(f"| {_network(key, axes)} | {name} | {_fmt(payload, 0)} | {_fmt(wire, 0)} | {_fmt(ratio, 1)} | "
                         f"{_fmt(rows['step_time_s'].median(), 3)} | {_fmt(rows['final_divergence'].max(), 4)} |")
    return "\n".join(lines)


SPLIT_COLUMNS = ("step_time_s", "step_compute_s", "step_compress_s", "step_comm_s", "step_decompress_s", "step_optim_s")


def split_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Markdown: median step time and its parts in ms per network and compressor."""
    lines = ["| network | compressor | step ms | compute ms | compress ms | comm ms | decompress ms | optim ms |",
             "|---|---|---|---|---|---|---|---|"]
    for key, group in _groups(summary, axes):
        for name, rows in group.groupby("compressor", sort=False):
            cells = [_fmt(1000 * rows[c].mean(), 2) if c in rows else "-" for c in SPLIT_COLUMNS]
            lines.append(f"| {_network(key, axes)} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def render(results: Path, experiment: str) -> str:
    """The three tables, as markdown."""
    summary, axes = load_summary(results, experiment)
    return "\n\n".join([
        "Time to target validation perplexity, s (mean +- sd over repeats that reached it; reached/all):",
        time_to_target_table(summary, axes),
        "A2SGD's speed-up to the target:", speedup_table(summary, axes),
        "Bytes per worker and step:", bytes_table(summary, axes),
        "Step time and its parts (medians):", split_table(summary, axes),
    ])


def main() -> None:
    """Print the tables for ``--results``/``--experiment``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--experiment", default="a2sgd-network")
    args = parser.parse_args()
    try:
        print(render(args.results, args.experiment))
    except ValueError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
