"""`orch report`: figures from known data, the HTML/Markdown page, MLflow artifacts (no Ray)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.report import page
from orchestrator.report.data import load_experiment
from orchestrator.report.figures import FIGURES
from orchestrator.report.summary import speedup_table
from orchestrator.store import ExperimentStore
from tests.report.synthetic import RATES, serving_experiment, training_experiment, ttft_ms
from workloads.serving.metrics.tables import TABLES as SERVING_TABLES


def _spec(name: str):
    return next(s for s in FIGURES if s.name == name)


def _errorbars(fig) -> dict[str, tuple[list[float], list[float]]]:
    """legend label -> (y values, error-bar lengths) of an errorbar figure."""
    ax = fig.axes[0]
    out = {}
    for container, label in zip(*ax.get_legend_handles_labels(), strict=True):
        ys = list(container.lines[0].get_ydata())
        bars = container.lines[2]
        lengths = [abs(seg[1][1] - seg[0][1]) for seg in bars[0].get_segments()] if bars else []
        out[label] = (ys, lengths)
    return out


def test_serving_figures_follow_the_varying_axes(tmp_path: Path) -> None:
    data = load_experiment(serving_experiment(tmp_path))
    assert data.varying == ["backend", "request_rate"]
    drawn = {s.name for s in FIGURES if s.draw(data) is not None}
    # Latency and goodput vary with rate; no budget or model axis, so no budget/model figure.
    assert drawn == {"ttft_vs_rate", "tpot_vs_rate", "itl_vs_rate", "e2el_vs_rate", "goodput_vs_rate"}
    fig = _spec("ttft_vs_rate").draw(data)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "request rate (requests/s)" and ax.get_ylabel() == "TTFT (ms)"
    series = _errorbars(fig)
    assert set(series) == {"full p50", "full p99", "h2o p50", "h2o p99"}
    ys, errors = series["h2o p50"]
    # Mean of the two repeats (base - 1, base + 1); error bar = +-std = +-sqrt(2).
    assert ys == pytest.approx([(ttft_ms("h2o", r, 0) + ttft_ms("h2o", r, 1)) / 2 for r in RATES])
    assert errors == pytest.approx([2 * 2**0.5] * len(RATES))
    assert series["full p99"][0] == pytest.approx([2 * 10.0 * r for r in RATES])


def test_single_repeat_has_no_error_bars(tmp_path: Path) -> None:
    data = load_experiment(serving_experiment(tmp_path, repeats=1))
    assert all(not errors for _, errors in _errorbars(_spec("ttft_vs_rate").draw(data)).values())


def test_training_figures_and_speedup(tmp_path: Path) -> None:
    data = load_experiment(training_experiment(tmp_path))
    drawn = {s.name for s in FIGURES if s.draw(data) is not None}
    assert {"train_loss_vs_step", "valid_loss_vs_time", "ppl_vs_step", "ppl_vs_time", "bytes_per_step",
            "step_time_split"} <= drawn
    assert "accuracy_vs_step" not in drawn and "ttft_vs_rate" not in drawn
    bytes_fig = _spec("bytes_per_step").draw(data).axes[0]
    assert bytes_fig.get_yscale() == "log"
    heights = [p.get_height() for p in bytes_fig.patches]
    assert heights == pytest.approx([4e6, 8e4, 8.0])  # dense, topk, a2sgd in grid order
    split = _spec("step_time_split").draw(data).axes[0]
    dense_total = sum(p.get_height() for p in split.patches if p.get_x() < 0.5)
    assert dense_total == pytest.approx(0.1)
    # the measured step as a mark on each bar (parts of overlapped hooks can stack above it)
    marks = [c.get_segments()[0][0][1] for c in split.collections if c.get_gid() == "whole"]
    assert marks == pytest.approx([0.1, 0.05, 0.025])  # dense, topk, a2sgd step_s
    loss = _spec("valid_loss_vs_time").draw(data).axes[0]
    assert loss.get_xlabel() == "training time: steps only (s)"  # train_s: no evaluations or checkpoints
    a2sgd = next(line for line in loss.get_lines() if line.get_label() == "a2sgd")
    assert max(a2sgd.get_xdata()) == pytest.approx(15 * 0.025)  # last eval step x a2sgd's step time

    speedup = speedup_table(data).set_index("compressor")
    assert speedup.loc["topk", "step time speedup vs dense"] == pytest.approx(2.0, rel=0.02)
    assert speedup.loc["a2sgd", "step time speedup vs dense"] == pytest.approx(4.0, rel=0.02)
    assert speedup.loc["a2sgd", "step time speedup vs topk"] == pytest.approx(2.0, rel=0.02)
    assert speedup.loc["dense", "step time speedup vs dense"] == pytest.approx(1.0)


def test_a_target_one_repeat_never_reached_has_no_time_to_target(tmp_path: Path) -> None:
    times = {"dense": [1.0, 1.2], "topk": [0.5, None], "a2sgd": [0.25, 0.25]}
    data = load_experiment(training_experiment(tmp_path, time_to_target=times))
    speedup = speedup_table(data).set_index("compressor")
    # the mean over the repeat that reached it alone (0.5) would read as a 2.2x speedup
    assert math.isnan(speedup.loc["topk", "time_to_target_s"])
    assert math.isnan(speedup.loc["topk", "time to target speedup vs dense"])
    assert speedup.loc["a2sgd", "time to target speedup vs dense"] == pytest.approx(1.1 / 0.25)
    assert speedup.loc["a2sgd", "step time speedup vs dense"] == pytest.approx(4.0, rel=0.02)


def test_submissions_that_differ_only_in_their_base_are_not_repeats_of_each_other(tmp_path: Path) -> None:
    from orchestrator.report.summary import summarize
    from tests.report.synthetic import _write

    store = ExperimentStore(tmp_path, "serve")

    def trial(rate: float, model: str, num_requests: int, ttft: float) -> tuple:
        row = {"backend": "full", "ttft_ms_p99": ttft}
        depths = [0.5] if num_requests == 100 else [0.1, 0.9]  # a list-valued base parameter differs too
        return ({"model": model, "backend": {"name": "full"},
                 "load": {"request_rate": rate, "num_requests": num_requests, "seed": 0, "needle": {"depths": depths}}},
                0, {"serving_summary": pa.Table.from_pylist([row], schema=SERVING_TABLES["serving_summary"])})

    _write(store, "serving", ["load.request_rate"], [trial(1.0, "tiny", 100, 10.0), trial(2.0, "tiny", 100, 20.0)],
           SERVING_TABLES)
    _write(store, "serving", ["model"], [trial(1.0, "tiny", 1000, 500.0), trial(1.0, "big", 1000, 900.0)], SERVING_TABLES)
    (rep,) = summarize(load_experiment(store))
    assert rep.axes == ["request_rate", "model", "num_requests", "depths"]  # base values that differ: axes too
    rows = {(r.request_rate, r.model, r.num_requests, r.depths): (r.trials, r.ttft_ms_p99) for r in rep.frame.itertuples()}
    assert rows == {(1.0, "tiny", 100, "[0.5]"): (1, 10.0), (2.0, "tiny", 100, "[0.5]"): (1, 20.0),
                    (1.0, "tiny", 1000, "[0.1, 0.9]"): (1, 500.0), (1.0, "big", 1000, "[0.1, 0.9]"): (1, 900.0)}


def test_a_metric_some_repeats_lack_has_no_mean(tmp_path: Path) -> None:
    from orchestrator.report.summary import summarize

    store = serving_experiment(tmp_path, "serve", no_p99=frozenset({("full", 1.0, 1)}))
    (rep,) = summarize(load_experiment(store))
    row = rep.frame[(rep.frame.backend == "full") & (rep.frame.request_rate == 1.0)].index[0]
    assert math.isnan(rep.frame.loc[row, "ttft_ms_p99"]) and math.isnan(rep.spread.loc[row, "ttft_ms_p99"])
    assert rep.frame.loc[row, "ttft_ms_p50"] == pytest.approx(10.0)  # the other metrics are whole
    # the figures agree: full's p99 line has no point at rate 1, its p50 line has
    axes = _spec("ttft_vs_rate").draw(load_experiment(store)).axes[0]
    lines = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in axes.containers}  # errorbar containers
    assert lines["full p99"] == [2.0, 4.0] and lines["full p50"] == [1.0, 2.0, 4.0] and lines["h2o p99"] == [1.0, 2.0, 4.0]


def test_html_page_is_self_contained(tmp_path: Path) -> None:
    data = load_experiment(training_experiment(tmp_path))
    files = page.write(page.build(data), tmp_path / "out", "html")
    text = files[0].read_text()
    assert files[0].name == "index.html"
    names = {p.stem for p in (tmp_path / "out" / "figures").glob("*.svg")}
    assert names == set(re.findall(r'<figure id="fig-([a-z0-9_]+)"', text)) and len(names) >= 6
    # Nothing to fetch: no links, scripts or remote sources; figures are data URIs.
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "<script" not in text
    assert "Speedup against the baselines" in text and "± " in text
    svg = (tmp_path / "out" / "figures" / "bytes_per_step.svg").read_text()
    assert svg.startswith("<svg") and "<text" not in svg  # text as paths: no fonts needed


def test_cli_report_md_and_mlflow_artifacts(tmp_path: Path) -> None:
    from orchestrator.tracking import Tracker

    store = serving_experiment(tmp_path)
    tracker = Tracker(store)
    manifest = store.load_manifest()
    manifest["submissions"][0]["parent_run_id"] = tracker.start_parent({"id": "s1", "kind": "serving"})
    store.save_manifest(manifest)
    result = CliRunner().invoke(main, ["report", "serve", "--results", str(tmp_path), "--format", "md"])
    assert result.exit_code == 0, result.output
    md = (store.path / "report" / "report.md").read_text()
    assert "![TTFT vs request rate](figures/ttft_vs_rate.svg)" in md and "| backend | request_rate |" in md
    run_id = manifest["submissions"][0]["parent_run_id"]
    logged = {a.path for a in tracker.client.list_artifacts(run_id, "report")}
    assert logged == {"report/report.md", "report/figures"}
    figures = {a.path for a in tracker.client.list_artifacts(run_id, "report/figures")}
    assert "report/figures/ttft_vs_rate.svg" in figures and len(figures) == 5


def test_cli_report_terminal_unchanged(tmp_path: Path) -> None:
    serving_experiment(tmp_path)
    result = CliRunner().invoke(main, ["report", "serve", "--results", str(tmp_path)])
    assert result.exit_code == 0 and "serving_summary" in result.output and "ttft_ms_p99" in result.output
    assert not (tmp_path / "serve" / "report").exists()


def test_zip_partners_do_not_lengthen_series_labels(tmp_path: Path) -> None:
    import pandas as pd

    from orchestrator.report.figures import _groups

    frame = pd.DataFrame({"backend": ["full", "h2o", "full", "h2o"], "transport": ["http", "inprocess"] * 2,
                          "kv_budget": [1.0, 1.0, 0.5, 0.5]})
    assert [label for label, _ in _groups(frame, ["backend", "transport"])] == ["full", "h2o"]
    labels = [label for label, _ in _groups(frame, ["backend", "transport", "kv_budget"])]
    assert labels == ["backend=full, kv_budget=1.0", "backend=h2o, kv_budget=1.0", "backend=full, kv_budget=0.5",
                      "backend=h2o, kv_budget=0.5"]


def test_quality_next_to_memory_and_throughput_per_budget(tmp_path: Path) -> None:
    from orchestrator.report.summary import budget_table
    from tests.report.synthetic import budget_experiment, needle_accuracy

    data = load_experiment(budget_experiment(tmp_path))
    drawn = {s.name for s in FIGURES if s.draw(data) is not None}
    assert {"needle_vs_budget", "quality_vs_memory", "quality_vs_throughput", "peak_kv_vs_budget",
            "throughput_vs_budget"} <= drawn and "quality_vs_budget" not in drawn  # no perplexity measured
    # The quality-vs-budget curve per policy and context length.
    series = _errorbars(_spec("needle_vs_budget").draw(data))
    assert series["backend=h2o, input_len=2048"][0] == pytest.approx([needle_accuracy("h2o", b, 2048) for b in (0.2, 0.5)])
    assert series["backend=full, input_len=1024"][0] == [1.0]
    # Trade-off: one point per budget at (peak KV MiB, accuracy), labelled with the budget.
    ax = _spec("quality_vs_memory").draw(data).axes[0]
    line = next(li for li in ax.get_lines() if li.get_label() == "backend=streaming, input_len=1024")
    assert list(line.get_xdata()) == pytest.approx([0.8, 2.0])
    assert list(line.get_ydata()) == pytest.approx([needle_accuracy("streaming", b, 1024) for b in (0.2, 0.5)])
    assert ax.get_ylabel() == "needle accuracy (fraction answered exactly)"
    assert {t.get_text() for t in ax.texts} == {"0.2", "0.5", "1"}

    table = budget_table(data)
    row = table[(table["backend"] == "h2o") & (table["input_len"] == 2048) & (table["kv_budget"] == 0.2)].iloc[0]
    assert row["needle accuracy"] == pytest.approx(needle_accuracy("h2o", 0.2, 2048))
    assert row["peak KV (MiB)"] == pytest.approx(1.6) and row["output tokens/s"] == pytest.approx(500.0)
    assert row["peak KV between steps (MiB)"] == pytest.approx(0.8)
    assert "perplexity ratio" not in table.columns  # not measured: no empty column
    html = page.to_html(page.build(data))
    assert "Quality, memory and throughput per KV budget" in html and 'id="fig-quality_vs_memory"' in html


def test_a_budget_in_tokens_gets_the_same_figures_and_table(tmp_path: Path) -> None:
    from orchestrator.report.summary import budget_table
    from tests.report.synthetic import budget_experiment, needle_accuracy

    data = load_experiment(budget_experiment(tmp_path, knob="kv_budget_tokens"))
    drawn = {s.name for s in FIGURES if s.draw(data) is not None}
    assert {"needle_vs_budget_tokens", "quality_vs_memory_tokens", "peak_kv_vs_budget_tokens"} <= drawn
    assert "needle_vs_budget" not in drawn
    series = _errorbars(_spec("needle_vs_budget_tokens").draw(data))
    assert series["backend=streaming, input_len=1024"][0] == pytest.approx(
        [needle_accuracy("streaming", b, 1024) for b in (0.2, 0.5)])
    table = budget_table(data)
    assert list(table.columns[:3]) == ["backend", "input_len", "kv_budget_tokens"]
    assert sorted(table[table["backend"] == "h2o"]["kv_budget_tokens"].unique()) == [200, 500]


def test_a_resubmission_with_other_axes_keeps_the_earlier_trials_apart(tmp_path: Path) -> None:
    """Same experiment, second grid with other axes: the report groups by every axis its trials varied."""
    import itertools

    import pandas as pd

    from orchestrator.report.summary import summarize
    from tests.report.synthetic import BACKENDS, MODELS, PROMPT_SOURCES, resubmitted_serving_experiment

    store = resubmitted_serving_experiment(tmp_path)
    assert store.load_manifest()["axes"] == ["model", "load.prompt_source"]  # the last grid's only
    (rep,) = summarize(load_experiment(store))
    assert rep.axes == ["backend", "request_rate", "model", "prompt_source"]
    rows = {(r.backend, r.request_rate, r.model, None if pd.isna(r.prompt_source) else r.prompt_source):
            (r.trials, round(r.ttft_ms_p50, 9)) for r in rep.frame.itertuples()}
    # The first submission's 12 trials: one row per backend and rate (their 2 repeats), null prompt_source
    # (that grid did not set it); the second's 4 trials: one row each.
    first = {(b, rate, "tiny", None): (2, round((ttft_ms(b, rate, 0) + ttft_ms(b, rate, 1)) / 2, 9))
             for b, rate in itertools.product(BACKENDS, RATES)}
    second = {("full", 1.0, m, s): (1, 100.0 + 10 * i) for i, (m, s) in enumerate(itertools.product(MODELS, PROMPT_SOURCES))}
    assert rows == first | second

    terminal = CliRunner().invoke(main, ["report", "serve", "--results", str(tmp_path)])
    assert terminal.exit_code == 0, terminal.output
    assert "prompt_source" in terminal.output and "request_rate" in terminal.output
    sections = page.build(load_experiment(store)).sections
    assert sections[0].columns[:5] == ["backend", "request_rate", "model", "prompt_source", "trials"]
    assert len(sections[0].rows) == 10 and ["h2o", "4", "tiny", "-", "2"] in [row[:5] for row in sections[0].rows]
