"""Measurements while trials run: live records from trials to the driver, and Ray metrics.

A trial calls ``ctx.report(record, step)`` (a ``LiveReporter``; picklable, so a kind can hand
it to the processes that do the work, such as Ray Train workers). Each record's known keys
become Ray metrics in the reporting process (``telemetry.TrialTelemetry``); records with a
step are batched to a per-submission ``LiveSink`` actor, which the first reporting trial
creates (so submissions whose trials report nothing never start it). The driver drains the
sink in its loop (``LiveChannel.poll``), hands the records to the MLflow logger thread, the
single writer, which logs them as step metrics (``live/<key>``) of the trial's run while it
runs, and kills the sink at the end (it is detached so that it outlives the trial that made it;
a driver killed outright leaves it behind, idle, holding no resources).
Parquet stays the record, written when the trial ends; live records are best effort.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray

from orchestrator.telemetry import TrialTelemetry

NAMESPACE = "orch-live"
FLUSH_S = 1.0
MAX_BUFFER = 500


@ray.remote(num_cpus=0)
class LiveSink:
    """Holds live records until the driver drains them."""

    def __init__(self) -> None:
        self._records: list[tuple[str, int, dict[str, float]]] = []

    def push(self, trial_id: str, records: list[tuple[int, dict[str, float]]]) -> None:
        """Add a trial's (step, metrics) records."""
        self._records.extend((trial_id, step, metrics) for step, metrics in records)

    def drain(self) -> list[tuple[str, int, dict[str, float]]]:
        """Every record since the last drain."""
        out, self._records = self._records, []
        return out


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and v == v}


class LiveReporter:
    """``TrialContext.report`` of one trial attempt: Ray metrics now, step records to the driver."""

    def __init__(self, experiment: str, trial_id: str, sink_name: str | None):
        self.experiment = experiment
        self.trial_id = trial_id
        self.sink_name = sink_name
        self._reset()

    def _reset(self) -> None:
        self._telemetry: TrialTelemetry | None = None
        self._sink: Any = None
        self._buffer: list[tuple[int, dict[str, float]]] = []
        self._flushed_at = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "trial_id": self.trial_id, "sink_name": self.sink_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __call__(self, record: dict[str, Any], step: int | None = None) -> None:
        """Publish one record; with a step it also goes to MLflow (batched, about once a second)."""
        try:
            if self._telemetry is None:
                self._telemetry = TrialTelemetry(self.experiment, self.trial_id)
            self._telemetry.observe(record)
            if step is None or self.sink_name is None:
                return
            self._buffer.append((int(step), _scalars(record)))
            if time.monotonic() - self._flushed_at >= FLUSH_S or len(self._buffer) >= MAX_BUFFER:
                self.flush()
        except Exception:  # live metrics are best effort: never fail the trial for them
            self._buffer = []

    def flush(self) -> None:
        """Send the buffered records to the driver's sink."""
        if not self._buffer or self.sink_name is None:
            return
        if self._sink is None:
            self._sink = LiveSink.options(
                name=self.sink_name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
            ).remote()
        self._sink.push.remote(self.trial_id, self._buffer)
        self._buffer = []
        self._flushed_at = time.monotonic()


class LiveChannel:
    """The driver's end: the sink actor, reporters for trials, and non-blocking draining."""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self.name = f"{experiment}-{uuid.uuid4().hex[:8]}"
        self._sink: Any = None
        self._pending: Any = None
        self._looked_at = 0.0

    def reporter(self, trial_id: str) -> LiveReporter:
        """The report callback of one trial attempt."""
        return LiveReporter(self.experiment, trial_id, self.name)

    def _find_sink(self, force: bool) -> None:
        # A trial creates the sink on its first report; look for it about once a second.
        if self._sink is not None or (not force and time.monotonic() - self._looked_at < FLUSH_S):
            return
        self._looked_at = time.monotonic()
        try:
            self._sink = ray.get_actor(self.name, namespace=NAMESPACE)
        except ValueError:  # no trial has reported yet
            self._sink = None

    def poll(self, timeout_s: float = 0.0) -> list[tuple[str, int, dict[str, float]]]:
        """Records that arrived since the last poll (never waits longer than ``timeout_s``)."""
        try:
            self._find_sink(force=timeout_s > 0)
            if self._sink is None:
                return []
            if self._pending is None:
                self._pending = self._sink.drain.remote()
            ready, _ = ray.wait([self._pending], timeout=timeout_s)
            if not ready:
                return []
            records = ray.get(self._pending)
        except Exception:  # the sink (or Ray) is gone: stop listening, keep running trials
            self._sink = None
            records = []
        self._pending = None
        return records

    def close(self) -> list[tuple[str, int, dict[str, float]]]:
        """The last records, then stop the sink."""
        records = self.poll(timeout_s=5.0)
        if self._sink is not None:
            try:
                ray.kill(self._sink)
            except Exception:  # already gone with its cluster
                pass
            self._sink = None
        return records
