"""The report's plots: a registry of figure specs, each drawn only when its data exist and vary.

A spec names the table it reads, so a kind's figures apply wherever its tables appear. Series
are the combinations of the varying grid axes other than the x axis; repeats of one
configuration are averaged, and their standard deviation is drawn as error bars (or a band).
Figures are built with matplotlib's object API (no pyplot, no global state) and saved as SVG
with text as paths, so they render the same everywhere without fonts or network.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from orchestrator.report.data import ExperimentData

MIB = float(2**20)
FIGSIZE = (6.4, 4.0)
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclass(frozen=True)
class Metric:
    """A column drawn as one line per series; ``label`` tells lines of one figure apart."""

    column: str
    label: str = ""


@dataclass(frozen=True)
class Rendered:
    """One drawn figure: its name, title and SVG text."""

    name: str
    title: str
    svg: str


def _numeric(values: pd.Series) -> bool:
    converted = pd.to_numeric(values.dropna(), errors="coerce")
    return len(converted) > 0 and not converted.isna().any()


def _series_label(keys: Any, columns: Sequence[str]) -> str:
    keys = keys if isinstance(keys, tuple) else (keys,)
    if len(columns) == 1:
        return str(keys[0])
    return ", ".join(f"{c}={k}" for c, k in zip(columns, keys, strict=True))


def _distinguishing(frame: pd.DataFrame, series: list[str]) -> list[str]:
    """The series axes minus those another determines (zip partners): shorter labels, same groups."""
    keep = list(series)
    for column in reversed(series):  # the grid's later axes go first: earlier ones name things
        rest = [c for c in keep if c != column]
        if rest and frame.groupby(rest, dropna=False).ngroups == frame.groupby(keep, dropna=False).ngroups:
            keep = rest
    return keep


def _groups(frame: pd.DataFrame, series: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per series, in order of first appearance; one unnamed group without series."""
    series = _distinguishing(frame, series)
    if not series:
        return [("", frame)]
    grouped = frame.groupby(series, sort=False, dropna=False)
    return [(_series_label(keys, series), rows) for keys, rows in grouped]


def _new_figure(title: str, x_label: str, y_label: str, log_y: bool) -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return fig, ax


def to_svg(fig: Figure) -> str:
    """The figure as standalone SVG text (no XML prolog, text as paths)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


class FigureSpec:
    """A figure of the report; ``draw`` returns None when the data do not support it."""

    name: str
    title: str

    def draw(self, data: ExperimentData) -> Figure | None:
        """Draw from an experiment's data, or None."""
        raise NotImplementedError


@dataclass(frozen=True)
class Against(FigureSpec):
    """Summary metrics against one grid axis, a line per series, error bars from repeats."""

    name: str
    title: str
    table: str
    x: str
    x_label: str
    metrics: tuple[Metric, ...]
    y_label: str
    scale: float = 1.0
    log_y: bool = False

    def draw(self, data: ExperimentData) -> Figure | None:
        """Drawn only when the x axis varies and a metric has values."""
        frame = data.table(self.table)
        if frame is None or self.x not in data.varying:
            return None
        metrics = [m for m in self.metrics if m.column in frame.columns and frame[m.column].notna().any()]
        if not metrics:
            return None
        series = [a for a in data.varying if a != self.x]
        numeric_x = _numeric(frame[self.x])
        categories = list(dict.fromkeys(frame[self.x].astype(str)))
        fig, ax = _new_figure(self.title, self.x_label, self.y_label, self.log_y)
        for index, (label, rows) in enumerate(_groups(frame, series)):
            color = f"C{index % 10}"
            for style, metric in zip(LINESTYLES * 4, metrics, strict=False):
                values = rows[[self.x, metric.column]].dropna(subset=[self.x])
                if values[metric.column].isna().all():
                    continue
                key = values[self.x].astype(float) if numeric_x else values[self.x].astype(str)
                grouped = (values[metric.column].astype(float) / self.scale).groupby(key, sort=True)
                stats = grouped.agg(["std", "count"]).assign(mean=grouped.mean(skipna=False))
                # A point some repeat lacks the metric at is not drawn, as the tables show no mean there.
                stats = stats[stats["mean"].notna()]
                if not numeric_x:
                    stats = stats.reindex([c for c in categories if c in stats.index])
                xs = list(stats.index) if numeric_x else [categories.index(c) for c in stats.index]
                errors = stats["std"].where(stats["count"] > 1)
                name = " ".join(p for p in (label, metric.label) if p) or metric.column
                ax.errorbar(xs, stats["mean"], yerr=errors if errors.notna().any() else None, color=color,
                            linestyle=style, marker=MARKERS[index % len(MARKERS)], capsize=3, label=name)
        if not numeric_x:
            ax.set_xticks(range(len(categories)), categories, rotation=20)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        return fig


@dataclass(frozen=True)
class Curve(FigureSpec):
    """A step table's metric against step or time, a line per series, a band from repeats."""

    name: str
    title: str
    table: str
    x: str
    x_label: str
    y: str
    y_label: str
    # Rows kept: column -> value (e.g. split=valid, model=rank0).
    where: tuple[tuple[str, Any], ...] = ()
    log_y: bool = False

    def draw(self, data: ExperimentData) -> Figure | None:
        """Drawn when the table has at least two x values with a y value."""
        frame = data.table(self.table)
        if frame is None or self.x not in frame.columns or self.y not in frame.columns:
            return None
        for column, value in self.where:
            if column in frame.columns:
                frame = frame[frame[column] == value]
        frame = frame.dropna(subset=[self.x, self.y])
        if frame[self.x].nunique() < 2:
            return None
        fig, ax = _new_figure(self.title, self.x_label, self.y_label, self.log_y)
        for index, (label, rows) in enumerate(_groups(frame, data.varying)):
            # Repeats share steps; at each step the mean of x (time differs by repeat) and of y.
            stats = rows.groupby("step" if "step" in rows.columns else self.x, sort=True).agg(
                x=(self.x, "mean"), y=(self.y, "mean"), spread=(self.y, "std"), n=(self.y, "count"))
            color = f"C{index % 10}"
            ax.plot(stats["x"], stats["y"], color=color, label=label or self.y)
            band = stats[stats["n"] > 1]
            if not band.empty:
                ax.fill_between(band["x"], band["y"] - band["spread"], band["y"] + band["spread"], color=color, alpha=0.2)
        ax.legend(fontsize="small")
        return fig


@dataclass(frozen=True)
class Bars(FigureSpec):
    """Summary metrics per series as (stacked) bars; error bars from repeats on the total."""

    name: str
    title: str
    table: str
    parts: tuple[Metric, ...]
    y_label: str
    log_y: bool = False
    # Aggregate the table's rows per trial first (per-step tables): mean over steps.
    per_trial_mean: bool = False
    where: tuple[tuple[str, Any], ...] = ()
    # A measured whole the parts may overlap within (a step's time, where communication runs
    # during backward): drawn as a mark on each bar, so a stack above it reads as overlap.
    whole: Metric | None = None

    def draw(self, data: ExperimentData) -> Figure | None:
        """Drawn when any part has values."""
        frame = data.table(self.table)
        if frame is None:
            return None
        parts = [p for p in self.parts if p.column in frame.columns and frame[p.column].notna().any()]
        if not parts:
            return None
        for column, value in self.where:
            if column in frame.columns:
                frame = frame[frame[column] == value]
        columns = [p.column for p in parts]
        whole = self.whole if self.whole is not None and self.whole.column in frame.columns else None
        if whole is not None:
            columns.append(whole.column)
        if self.per_trial_mean:
            frame = frame.groupby("trial_id", sort=False)[columns].mean().join(data.trials, on="trial_id").reset_index()
        fig, ax = _new_figure(self.title, "", self.y_label, self.log_y)
        labels = []
        for position, (label, rows) in enumerate(_groups(frame, data.varying)):
            labels.append(label or data.experiment)
            bottom = 0.0
            means = [float(rows[part.column].astype(float).mean(skipna=False)) for part in parts]
            if any(m != m for m in means):
                continue  # some repeat lacks a part: no bar, as the tables show no mean there
            for index, (part, mean) in enumerate(zip(parts, means, strict=True)):
                ax.bar(position, mean, bottom=bottom, color=f"C{index % 10}",
                       label=part.label if position == 0 and len(parts) > 1 else None)
                bottom += mean
            if whole is not None:
                ax.hlines(float(rows[whole.column].astype(float).mean()), position - 0.45, position + 0.45,
                          colors="black", linewidth=2, label=whole.label if position == 0 else None, gid="whole")
            totals = rows[[p.column for p in parts]].astype(float).sum(axis=1)
            if len(totals) > 1:
                ax.errorbar(position, bottom, yerr=float(totals.std()), color="black", capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        if len(parts) > 1 or whole is not None:
            ax.legend(fontsize="small")
        return fig


@dataclass(frozen=True)
class Tradeoff(FigureSpec):
    """One summary metric against another, a line per series through the values of an axis.

    Each point is one value of ``along`` (say the KV budget), labelled with it, so the figure
    shows what a setting buys and what it costs (quality against memory or throughput).
    ``y`` lists candidate metrics: the first one with values is drawn.
    """

    name: str
    title: str
    table: str
    along: str
    x: Metric
    x_label: str
    y: tuple[Metric, ...]
    x_scale: float = 1.0

    def draw(self, data: ExperimentData) -> Figure | None:
        """Drawn when ``along`` varies and both metrics have values."""
        frame = data.table(self.table)
        if frame is None or self.along not in data.varying or self.x.column not in frame.columns:
            return None
        y = next((m for m in self.y if m.column in frame.columns and frame[m.column].notna().any()), None)
        if y is None or not frame[self.x.column].notna().any():
            return None
        series = [a for a in data.varying if a != self.along]
        fig, ax = _new_figure(self.title, self.x_label, y.label or y.column, False)
        for index, (label, rows) in enumerate(_groups(frame, series)):
            values = rows[[self.along, self.x.column, y.column]].dropna()
            if values.empty:
                continue
            means = values.astype({self.x.column: float, y.column: float}).groupby(self.along, sort=True).mean()
            xs = means[self.x.column] / self.x_scale
            ax.plot(xs, means[y.column], color=f"C{index % 10}", marker=MARKERS[index % len(MARKERS)],
                    label=label or y.column)
            for along, x_value, y_value in zip(means.index, xs, means[y.column], strict=True):
                ax.annotate(format(along, "g") if isinstance(along, float) else str(along), (x_value, y_value),
                            textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        return fig


def _latency(metric: str, label: str) -> Against:
    return Against(
        name=f"{metric}_vs_rate", title=f"{label} vs request rate", table="serving_summary", x="request_rate",
        x_label="request rate (requests/s)", metrics=(Metric(f"{metric}_ms_p50", "p50"), Metric(f"{metric}_ms_p99", "p99")),
        y_label=f"{label} (ms)",
    )


# The quality a trade-off figure shows: needle retrieval when the load had needles, else agreement.
_QUALITY = (Metric("needle_accuracy", "needle accuracy (fraction answered exactly)"),
            Metric("token_agreement", "greedy-token agreement with the full cache"))



def _budget_figures(axis: str, x_label: str, suffix: str) -> tuple[FigureSpec, ...]:
    """What a KV budget buys and costs, against a budget axis (a fraction, or a token count)."""
    table = "serving_summary"
    return (
        Against(name=f"throughput_vs_budget{suffix}", title="Output throughput vs KV budget", table=table, x=axis,
                x_label=x_label, metrics=(Metric("output_throughput"),), y_label="output throughput (tokens/s)"),
        Against(name=f"peak_kv_vs_budget{suffix}", title="Peak KV memory vs KV budget", table=table, x=axis,
                x_label=x_label, metrics=(Metric("peak_kv_bytes", "device"), Metric("peak_kv_bytes_host", "host")),
                y_label="peak KV (MiB)", scale=MIB),
        Against(name=f"quality_vs_budget{suffix}", title="Quality vs KV budget", table=table, x=axis, x_label=x_label,
                metrics=(Metric("ppl_ratio", "perplexity ratio"), Metric("token_agreement", "greedy-token agreement")),
                y_label="vs the full cache (ratio)"),
        Against(name=f"needle_vs_budget{suffix}", title="Needle retrieval vs KV budget", table=table, x=axis,
                x_label=x_label, metrics=(Metric("needle_accuracy"),), y_label="needle accuracy (fraction answered exactly)"),
        Tradeoff(name=f"quality_vs_memory{suffix}", title="Quality vs peak KV memory (points: KV budget)", table=table,
                 along=axis, x=Metric("peak_kv_bytes"), x_label="peak KV (MiB)", x_scale=MIB, y=_QUALITY),
        Tradeoff(name=f"quality_vs_throughput{suffix}", title="Quality vs output throughput (points: KV budget)",
                 table=table, along=axis, x=Metric("output_throughput"), x_label="output throughput (tokens/s)",
                 y=_QUALITY),
    )


SERVING_FIGURES: tuple[FigureSpec, ...] = (
    _latency("ttft", "TTFT"),
    _latency("tpot", "TPOT"),
    _latency("itl", "ITL"),
    _latency("e2el", "E2E latency"),
    Against(name="goodput_vs_rate", title="Goodput vs request rate", table="serving_summary", x="request_rate",
            x_label="request rate (requests/s)", metrics=(Metric("goodput"),), y_label="goodput (requests/s within SLO)"),
    *_budget_figures("kv_budget", "KV budget (fraction of the full cache)", ""),
    *_budget_figures("kv_budget_tokens", "KV budget (tokens kept per sequence, layer and KV head)", "_tokens"),
    Against(name="memory_vs_model", title="Memory vs model", table="serving_summary", x="model", x_label="model",
            metrics=(Metric("peak_device_bytes", "device peak"), Metric("peak_kv_bytes", "KV peak")),
            y_label="memory (MiB)", scale=MIB),
)

_EVAL = (("split", "valid"), ("model", "rank0"))
TRAINING_FIGURES: tuple[FigureSpec, ...] = (
    Curve(name="train_loss_vs_step", title="Training loss vs step", table="train_steps", x="step", x_label="step",
          y="loss", y_label="training loss (nats/token)", where=(("rank", 0),)),
    Curve(name="valid_loss_vs_step", title="Validation loss vs step", table="train_evals", x="step", x_label="step",
          y="loss", y_label="validation loss", where=_EVAL),
    Curve(name="valid_loss_vs_time", title="Validation loss vs training time", table="train_evals", x="train_s",
          x_label="training time: steps only (s)", y="loss", y_label="validation loss", where=_EVAL),
    Curve(name="ppl_vs_step", title="Validation perplexity vs step", table="train_evals", x="step", x_label="step",
          y="ppl", y_label="perplexity", where=_EVAL, log_y=True),
    Curve(name="ppl_vs_time", title="Validation perplexity vs training time", table="train_evals", x="train_s",
          x_label="training time: steps only (s)", y="ppl", y_label="perplexity", where=_EVAL, log_y=True),
    Curve(name="accuracy_vs_step", title="Validation accuracy vs step", table="train_evals", x="step", x_label="step",
          y="accuracy", y_label="accuracy (fraction)", where=_EVAL),
    Bars(name="bytes_per_step", title="Bytes sent per worker per step", table="train_summary",
         parts=(Metric("bytes_per_worker_step"),), y_label="bytes per worker-step (log scale)", log_y=True),
    Bars(name="step_time_split", title="Where a step's time goes (mean, rank 0)", table="train_steps",
         parts=(Metric("compute_s", "compute"), Metric("compress_s", "compress"), Metric("comm_s", "communicate"),
                Metric("decompress_s", "decompress"), Metric("optim_s", "optimizer")),
         y_label="time per step (s)", per_trial_mean=True, where=(("rank", 0),),
         whole=Metric("step_s", "measured step")),
)

# Every figure applies wherever its table appears, whatever the trial kind's name.
FIGURES: tuple[FigureSpec, ...] = SERVING_FIGURES + TRAINING_FIGURES


def render(data: ExperimentData) -> list[Rendered]:
    """Every registered figure the experiment's data support, as SVG."""
    out = []
    for spec in FIGURES:
        fig = spec.draw(data)
        if fig is not None:
            out.append(Rendered(name=spec.name, title=spec.title, svg=to_svg(fig)))
    return out
