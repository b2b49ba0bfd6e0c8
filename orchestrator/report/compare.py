"""`orch compare A B`: two experiments' summaries on the configurations they share.

A configuration is the values of the axes of either experiment (repeats and seeds excluded; an
experiment's axes are those any of its submissions varied and the parameters whose values differ
among its trials). An axis one experiment does not have takes, on its side, the value all its
trials ran (null where they did not set it): A's trials at request rate 8 never match a B that
ran rate 1 only. Per configuration
and metric: each side's mean and standard deviation over repeats, the relative change from A
to B, and whether the change exceeds the repeats' spread (about a 95% two-sample interval:
|B - A| > 2 sqrt(sA^2/nA + sB^2/nB); unknown without repeats). A metric *regressed* when it
moved in its bad direction by more than the threshold and, where the spread is known, by more
than the spread. A side whose repeats do not all have a metric has no mean for it, and B
missing a value A has is a regression.
"""

from __future__ import annotations

import math
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
    relative: float  # (B - A) / |A|; +-inf from A = 0; NaN where a side has no mean
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


def _fixed_values(side: ExperimentData, other: ExperimentData, keys: list[str]) -> dict[str, Any]:
    """The value ``side`` ran of each axis in ``keys`` it did not vary (its trials' common parameter;
    null where they do not set it), so that only the other's trials of that value match its trials."""
    dotted = {column: key for key, column in axis_names(other.manifest).items()}
    base = _base_params(side)
    return {column: base.get(dotted.get(column, column)) for column in keys if column not in side.axes}


def _stats(frame: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    if keys:
        grouped = frame.groupby(keys, dropna=False, sort=True)[metrics]
    else:
        grouped = frame.assign(_all=0).groupby("_all")[metrics]
    return grouped.agg(["mean", "std", "count", "size"])


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
    keys = list(dict.fromkeys([*a.axes, *b.axes]))
    fill_a, fill_b = _fixed_values(a, b, keys), _fixed_values(b, a, keys)
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
        frame_a, frame_b = frame_a.assign(**fill_a), frame_b.assign(**fill_b)
        params = a.param_columns(name) | b.param_columns(name)
        numeric = [
            c for c in frame_a.columns
            if c in frame_b.columns and c not in ID_COLUMNS and c not in keys and c not in params
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
                if ra["count"] == 0 and rb["count"] == 0:
                    continue
                # A side some of whose repeats lack the metric has no mean (a target one repeat
                # never reached is not reached); losing a value A had counts as a regression.
                mean_a, mean_b = (float(r["mean"]) if r["count"] == r["size"] else float("nan") for r in (ra, rb))
                if mean_b != mean_b:
                    relative, beyond, regressed = float("nan"), None, mean_a == mean_a
                else:
                    delta = mean_b - mean_a
                    # From 0 (no failures, no preemptions) any worsening is beyond every threshold.
                    relative = delta / abs(mean_a) if mean_a else (math.copysign(math.inf, delta) if delta else 0.0)
                    beyond = _spread_exceeded(float(ra["std"]), int(ra["count"]), float(rb["std"]), int(rb["count"]), delta)
                    worse = delta < 0 if higher_is_better(metric) else delta > 0
                    regressed = worse and abs(relative) > threshold and beyond is not False
                differences.append(Difference(name, labels, metric, mean_a, float(ra["std"]), int(ra["count"]),
                                              mean_b, float(rb["std"]), int(rb["count"]), relative, beyond,
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
