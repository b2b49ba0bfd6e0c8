"""`orch compare A B`: two experiments' summaries on the configurations they share.

A configuration is the values of the grid axes both experiments have (repeats and seeds
excluded; an experiment's axes are those any of its submissions varied, and a trial whose
submission did not vary one has no value there, matching only such trials). Per configuration
and metric: each side's mean and standard deviation over repeats, the relative change from A
to B, and whether the change exceeds the repeats' spread (about a 95% two-sample interval:
|B - A| > 2 sqrt(sA^2/nA + sB^2/nB); unknown without repeats). A metric *regressed* when it
moved in its bad direction by more than the threshold and, where the spread is known, by more
than the spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.expand import flatten
from orchestrator.report.data import REPEAT_AXES, ExperimentData, axis_names

# Metric names containing one of these improve upward; every other metric (latencies, times,
# bytes, perplexity, failures) improves downward.
HIGHER_IS_BETTER = ("throughput", "goodput", "completed", "accuracy", "token_agreement", "samples_per_s", "speedup")
ID_COLUMNS = frozenset({"trial_id", "experiment", "repeat", "trials"})


class CompareError(ValueError):
    """Two experiments that cannot be compared as asked (one line, for the CLI)."""


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is an improvement."""
    return any(part in metric for part in HIGHER_IS_BETTER)


@dataclass(frozen=True)
class Difference:
    """One metric of one shared configuration in both experiments."""

    table: str
    config: dict[str, Any]
    metric: str
    a_mean: float
    a_std: float
    a_n: int
    b_mean: float
    b_std: float
    b_n: int
    relative: float  # (B - A) / |A|; NaN when A is 0
    beyond_spread: bool | None  # None without repeats on both sides
    regressed: bool

    @property
    def improved(self) -> bool:
        """Moved in the good direction beyond the spread (where known)."""
        good = self.b_mean > self.a_mean if higher_is_better(self.metric) else self.b_mean < self.a_mean
        return good and self.beyond_spread is not False and not self.regressed and self.relative == self.relative


@dataclass(frozen=True)
class Comparison:
    """The differences plus what made the experiments differ beyond their axes."""

    keys: list[str]
    differences: list[Difference]
    base_differences: dict[str, tuple[Any, Any]]
    only_a: int  # configurations only A ran
    only_b: int

    def regressions(self, metrics: list[str] | None = None) -> list[Difference]:
        """Regressed differences, of ``metrics`` when given."""
        return [d for d in self.differences if d.regressed and (not metrics or d.metric in metrics)]


def _base_params(data: ExperimentData) -> dict[str, Any]:
    """Parameters every trial shares that are not axes (the grid's base)."""
    entries = list(data.manifest.get("trials", {}).values())
    if not entries:
        return {}
    axes = set(axis_names(data.manifest))  # what any of its submissions varied, not only the last grid
    flat = [flatten(e.get("params", {})) for e in entries]
    common = {k: v for k, v in flat[0].items() if all(f.get(k) == v for f in flat[1:])}
    return {k: v for k, v in common.items() if k not in axes and k.rsplit(".", 1)[-1] not in REPEAT_AXES}


def _stats(frame: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    if keys:
        grouped = frame.groupby(keys, dropna=False, sort=True)[metrics]
    else:
        grouped = frame.assign(_all=0).groupby("_all")[metrics]
    return grouped.agg(["mean", "std", "count"])


def _label(value: Any) -> Any:
    """An axis value as a matching key: null (a trial whose grid did not vary that axis) is None."""
    return None if value is None or (isinstance(value, float) and value != value) else value


def _configs(stats: pd.DataFrame) -> dict[tuple[Any, ...], int]:
    """Configuration (axis values, nulls as None) -> row position in ``stats``.

    Looked up by position: pandas cannot look a label holding NaN up in a MultiIndex.
    """
    return {tuple(_label(v) for v in (c if isinstance(c, tuple) else (c,))): i for i, c in enumerate(stats.index)}


def _spread_exceeded(a_std: float, a_n: int, b_std: float, b_n: int, delta: float) -> bool | None:
    if a_n < 2 or b_n < 2 or a_std != a_std or b_std != b_std:
        return None
    return abs(delta) > 2 * (a_std**2 / a_n + b_std**2 / b_n) ** 0.5


def compare(
    a: ExperimentData,
    b: ExperimentData,
    metrics: list[str] | None = None,
    threshold: float = 0.05,
    default_columns: dict[str, list[str]] | None = None,
) -> Comparison:
    """Differences of every summary table both experiments wrote, on their shared configurations."""
    keys = [axis for axis in a.axes if axis in b.axes]
    tables = sorted(
        {n for n in a.store.table_names() if n.endswith("_summary")} & {n for n in b.store.table_names() if n.endswith("_summary")}
    )
    if not tables:
        raise CompareError(f"{a.experiment} and {b.experiment} have no summary table in common")
    differences: list[Difference] = []
    only_a = only_b = 0
    known: set[str] = set()
    for name in tables:
        frame_a, frame_b = a.table(name), b.table(name)
        if frame_a is None or frame_b is None:
            continue
        params = a.param_columns(name) | b.param_columns(name)
        numeric = [
            c for c in frame_a.columns
            if c in frame_b.columns and c not in ID_COLUMNS and c not in a.axes and c not in b.axes and c not in params
            and pd.api.types.is_numeric_dtype(frame_a[c]) and not pd.api.types.is_bool_dtype(frame_a[c])
        ]
        known.update(numeric)
        wanted = [m for m in metrics if m in numeric] if metrics else [
            c for c in ((default_columns or {}).get(name) or numeric) if c in numeric
        ]
        if not wanted:
            continue
        stats_a, stats_b = _stats(frame_a, keys, wanted), _stats(frame_b, keys, wanted)
        configs_a, configs_b = _configs(stats_a), _configs(stats_b)
        shared = [config for config in configs_a if config in configs_b]
        only_a += len(configs_a) - len(shared)
        only_b += len(configs_b) - len(shared)
        for config in shared:
            labels = dict(zip(keys, config, strict=True)) if keys else {}
            for metric in wanted:
                ra, rb = stats_a.iloc[configs_a[config]][metric], stats_b.iloc[configs_b[config]][metric]
                if ra["count"] == 0 or rb["count"] == 0:
                    continue
                delta = float(rb["mean"] - ra["mean"])
                relative = delta / abs(ra["mean"]) if ra["mean"] else float("nan")
                beyond = _spread_exceeded(float(ra["std"]), int(ra["count"]), float(rb["std"]), int(rb["count"]), delta)
                worse = delta < 0 if higher_is_better(metric) else delta > 0
                regressed = worse and abs(relative) > threshold and beyond is not False
                differences.append(Difference(name, labels, metric, float(ra["mean"]), float(ra["std"]), int(ra["count"]),
                                              float(rb["mean"]), float(rb["std"]), int(rb["count"]), relative, beyond,
                                              bool(regressed)))
    unknown = [m for m in metrics or [] if m not in known]
    if unknown:
        raise CompareError(f"unknown metric(s) {', '.join(unknown)}; both experiments have: {', '.join(sorted(known))}")
    if not differences and (only_a or only_b):
        raise CompareError(f"{a.experiment} and {b.experiment} share no configuration of the axes {', '.join(keys) or '(none)'}")
    base_a, base_b = _base_params(a), _base_params(b)
    base_differences = {k: (base_a.get(k), base_b.get(k)) for k in sorted(set(base_a) | set(base_b))
                        if base_a.get(k) != base_b.get(k)}
    return Comparison(keys=keys, differences=differences, base_differences=base_differences, only_a=only_a, only_b=only_b)
