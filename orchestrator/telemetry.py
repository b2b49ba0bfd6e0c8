"""Live metrics through ``ray.util.metrics``, exported by Ray to Prometheus (see dashboards/).

Metric names (all prefixed ``orch_`` by us; Ray adds ``ray_``):
- ``orch_trials`` gauge, tags experiment, state: trials of the running submission by state;
- ``orch_trial_duration_s`` histogram, tags experiment, state: wall time of finished trials.
"""

from __future__ import annotations

from typing import Any

DURATION_BOUNDARIES = [0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600]


class Telemetry:
    """Driver-side metrics of one submission; a no-op when Ray metrics are unavailable."""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self._trials: Any = None
        self._duration: Any = None
        self._last: dict[str, int] = {}
        try:
            from ray.util import metrics

            self._trials = metrics.Gauge("orch_trials", "Trials by state", tag_keys=("experiment", "state"))
            self._duration = metrics.Histogram(
                "orch_trial_duration_s", "Trial wall time", boundaries=DURATION_BOUNDARIES, tag_keys=("experiment", "state")
            )
        except Exception:  # metrics are optional: never fail a submission for them
            self._trials = self._duration = None

    def update(self, counts: dict[str, int]) -> None:
        """Publish trial counts when they changed."""
        if self._trials is None or counts == self._last:
            return
        self._last = dict(counts)
        for state, value in counts.items():
            self._trials.set(value, tags={"experiment": self.experiment, "state": state})

    def trial_finished(self, state: str, duration_s: float) -> None:
        """Record one finished trial's duration."""
        if self._duration is not None:
            self._duration.observe(max(duration_s, 0.0), tags={"experiment": self.experiment, "state": state})
