"""Live metrics through ``ray.util.metrics``, exported by Ray to Prometheus (see dashboards/).

Every metric is declared once in ``METRICS``; Ray exports each as ``ray_<name>`` (histograms
as ``ray_<name>_bucket`` / ``_sum`` / ``_count``), and the Grafana dashboards query exactly
these names (a test checks it). The driver publishes trial counts and durations
(``Telemetry``); trials publish what they measure while they run (``TrialTelemetry``, fed by
the live records of ``orchestrator.live``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

RAY_PREFIX = "ray_"
DURATION_BOUNDARIES = [0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600]
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
STEP_BOUNDARIES = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
TRIAL_TAGS = ("experiment", "trial_id")


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: Ray metric class, name, description, tags, histogram boundaries."""

    kind: str  # gauge | histogram
    name: str
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()
    # The live-record key that feeds it (trial metrics only).
    source: str | None = None

    def exported(self) -> set[str]:
        """The series names Prometheus sees."""
        base = RAY_PREFIX + self.name
        if self.kind == "histogram":
            return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        return {base}


METRICS: tuple[MetricDef, ...] = (
    MetricDef("gauge", "orch_trials", "Trials of the running submission by state", ("experiment", "state")),
    MetricDef("histogram", "orch_trial_duration_s", "Wall time of finished trials (s)", ("experiment", "state"),
              tuple(DURATION_BOUNDARIES)),
    MetricDef("gauge", "orch_serving_requests_per_s", "Completed requests per second, last interval", TRIAL_TAGS,
              source="requests_per_s"),
    MetricDef("gauge", "orch_serving_output_tokens_per_s", "Output tokens per second, last interval", TRIAL_TAGS,
              source="output_tokens_per_s"),
    MetricDef("histogram", "orch_serving_ttft_s", "Time to first token of completed requests (s)", TRIAL_TAGS,
              tuple(TTFT_BOUNDARIES), source="ttft_s"),
    MetricDef("gauge", "orch_serving_kv_bytes_device", "KV cache bytes in use on the device", TRIAL_TAGS,
              source="kv_bytes_device"),
    MetricDef("gauge", "orch_serving_kv_bytes_host", "KV cache bytes in use in host memory", TRIAL_TAGS,
              source="kv_bytes_host"),
    MetricDef("gauge", "orch_train_bytes_per_step", "Bytes a worker sent in its last training step", TRIAL_TAGS,
              source="bytes_sent"),
    MetricDef("histogram", "orch_train_step_time_s", "Training step time (s)", TRIAL_TAGS, tuple(STEP_BOUNDARIES),
              source="step_s"),
)


def exported_names() -> set[str]:
    """Every series name the metrics above produce in Prometheus."""
    return set().union(*(m.exported() for m in METRICS))


def _build(definition: MetricDef) -> Any:
    from ray.util import metrics

    if definition.kind == "histogram":
        return metrics.Histogram(definition.name, definition.description, boundaries=list(definition.boundaries),
                                 tag_keys=definition.tags)
    return metrics.Gauge(definition.name, definition.description, tag_keys=definition.tags)


def _metric(name: str) -> Any:
    """The Ray metric object of a declared metric, or None where Ray metrics are unavailable."""
    try:
        return _build(next(m for m in METRICS if m.name == name))
    except Exception:  # metrics are optional: never fail a submission or trial for them
        return None


class Telemetry:
    """Driver-side metrics of one submission; a no-op when Ray metrics are unavailable."""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self._trials = _metric("orch_trials")
        self._duration = _metric("orch_trial_duration_s")
        self._last: dict[str, int] = {}

    def update(self, counts: dict[str, int]) -> None:
        """Publish trial counts when they changed (states that emptied drop to 0)."""
        if self._trials is None or counts == self._last:
            return
        for state in set(self._last) - set(counts):
            self._trials.set(0, tags={"experiment": self.experiment, "state": state})
        self._last = dict(counts)
        for state, value in counts.items():
            self._trials.set(value, tags={"experiment": self.experiment, "state": state})

    def trial_finished(self, state: str, duration_s: float) -> None:
        """Record one finished trial's duration."""
        if self._duration is not None:
            self._duration.observe(max(duration_s, 0.0), tags={"experiment": self.experiment, "state": state})


class TrialTelemetry:
    """Trial-side metrics: a live record's known keys set gauges and feed histograms."""

    def __init__(self, experiment: str, trial_id: str):
        self.tags = {"experiment": experiment, "trial_id": trial_id}
        self._metrics = {m.source: (m, _metric(m.name)) for m in METRICS if m.source}

    def observe(self, record: dict[str, Any]) -> None:
        """Publish the values of one live record (lists feed histograms value by value)."""
        for key, value in record.items():
            definition, metric = self._metrics.get(key, (None, None))
            if metric is None or value is None:
                continue
            values: Iterable[float] = value if isinstance(value, list | tuple) else [value]
            for item in values:
                if definition.kind == "histogram":
                    metric.observe(float(item), tags=self.tags)
                else:
                    metric.set(float(item), tags=self.tags)
