"""Comparison tables from an experiment's Parquet dataset, grouped by the axes its trials varied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.report.data import ExperimentData


@dataclass(frozen=True)
class SummaryReport:
    """One summary table aggregated over repeats: a row per combination of the axes."""

    table: str
    axes: list[str]
    frame: pd.DataFrame
    # Standard deviation over repeats, same shape as ``frame`` (NaN where a group has one trial).
    spread: pd.DataFrame | None = None


def summarize(data: ExperimentData, columns: dict[str, list[str]] | None = None) -> list[SummaryReport]:
    """Mean of each summary metric over repeats, per combination of the axes; only `done` trials.

    A metric that some repeat of a combination lacks has no mean there (not the mean of the
    others): a target one repeat never reached, say, is not reached.
    """
    reports = []
    for name in data.store.table_names():
        if not name.endswith("_summary"):
            continue
        frame = data.table(name)
        if frame is None:
            continue
        params = data.param_columns(name)
        axes = [a for a in data.axes if a in frame.columns]
        wanted = (columns or {}).get(name) or [
            c
            for c in frame.columns
            if c not in axes and c not in {"trial_id", "experiment", "repeat"} and c not in params
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        ]
        wanted = [c for c in wanted if c in frame.columns and c not in axes]
        if axes:
            grouped = frame.groupby(axes, dropna=False, sort=True)
            agg = grouped[wanted].mean(numeric_only=True, skipna=False)
            agg.insert(0, "trials", grouped.size())
            agg = agg.reset_index()
            spread = grouped[wanted].std(numeric_only=True).reset_index()
            for column in wanted:
                spread.loc[agg[column].isna(), column] = float("nan")
        else:
            agg = frame[wanted].mean(numeric_only=True, skipna=False).to_frame().T
            agg.insert(0, "trials", len(frame))
            spread = frame[wanted].std(numeric_only=True).to_frame().T
        reports.append(SummaryReport(table=name, axes=axes, frame=agg, spread=spread))
    return reports


def state_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Trials by state."""
    counts: dict[str, int] = {}
    for entry in manifest.get("trials", {}).values():
        counts[entry.get("state", "?")] = counts.get(entry.get("state", "?"), 0) + 1
    return counts


def format_value(value: Any) -> str:
    """Compact number formatting for terminal tables; a missing value (null) is ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


BASELINE_COMPRESSORS = ("dense", "topk", "qsgd")
SPEEDUP_METRICS = {"step_time_s": "step time", "time_to_target_s": "time to target"}


def speedup_table(data: ExperimentData) -> pd.DataFrame | None:
    """Per compressor: step time (and time to target) and the speedup against each baseline present.

    Speedup = the baseline's time / this compressor's time, on the same values of the other axes.
    """
    frame = data.table("train_summary")
    if frame is None or "compressor" not in data.varying:
        return None
    others = [a for a in data.varying if a != "compressor"]
    metrics = [m for m in SPEEDUP_METRICS if m in frame.columns and frame[m].notna().any()]
    if not metrics:
        return None
    grouped = frame.groupby(["compressor", *others], sort=False, dropna=False)
    means = grouped[metrics].mean().reset_index()
    if "time_to_target_s" in metrics:
        # A target that a repeat never reached is not reached: averaging the repeats that did
        # would flatter the compressor.
        means["time_to_target_s"] = grouped["time_to_target_s"].mean(skipna=False).to_numpy()
    baselines = [b for b in BASELINE_COMPRESSORS if b in set(means["compressor"])]
    rows = []
    for record in means.to_dict("records"):
        row = {"compressor": record["compressor"], **{a: record[a] for a in others}}
        for metric in metrics:
            row[f"{metric}"] = record[metric]
            for baseline in baselines:
                same = means["compressor"] == baseline
                for axis in others:  # null (an axis a submission left alone) matches null
                    same &= means[axis].isna() if pd.isna(record[axis]) else means[axis] == record[axis]
                match = means[same]
                base = float(match[metric].iloc[0]) if len(match) else float("nan")
                own = record[metric]
                row[f"{SPEEDUP_METRICS[metric]} speedup vs {baseline}"] = base / own if own and own == own else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# What one KV budget buys and costs, side by side: quality, memory, throughput.
BUDGET_METRICS = {
    "needle_accuracy": ("needle accuracy", 1.0),
    "ppl_ratio": ("perplexity ratio", 1.0),
    "token_agreement": ("token agreement", 1.0),
    "peak_kv_bytes": ("peak KV (MiB)", float(2**20)),
    # Between steps: what the policy keeps (the in-step peak also holds a prefill's whole KV).
    "peak_kv_bytes_steps": ("peak KV between steps (MiB)", float(2**20)),
    "output_throughput": ("output tokens/s", 1.0),
}


# A budget is a fraction of the tokens seen or a token count per sequence (policy knobs).
BUDGET_AXES = ("kv_budget", "kv_budget_tokens")


def budget_table(data: ExperimentData) -> pd.DataFrame | None:
    """Per series and KV budget: quality, peak KV memory and throughput (means over repeats).

    Drawn when a budget (``BUDGET_AXES``) varies and some quality metric was measured; the other varying axes
    (policy, context length, ...) name the rows, the budget last.
    """
    frame = data.table("serving_summary")
    budget = next((a for a in BUDGET_AXES if a in data.varying), None)
    if frame is None or budget is None:
        return None
    metrics = [m for m in BUDGET_METRICS if m in frame.columns and frame[m].notna().any()]
    if not any(m in metrics for m in ("needle_accuracy", "ppl_ratio", "token_agreement")):
        return None
    keys = [a for a in data.varying if a != budget] + [budget]
    means = frame.groupby(keys, sort=True, dropna=False)[metrics].mean().reset_index()
    for metric in metrics:
        means[metric] = means[metric] / BUDGET_METRICS[metric][1]
    return means.rename(columns={m: BUDGET_METRICS[m][0] for m in metrics})
