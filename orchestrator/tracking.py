"""MLflow: one experiment per grid, a parent run per submission, a child run per trial.

A trial is always logged from what the store wrote (its Parquet tables and artifacts), so a
live submission and a later ``orch sync`` log exactly the same thing. Conventions:
- every table named ``*_summary``: the numeric columns of its row are run metrics;
- tables named ``*_steps`` / ``*_evals`` with a ``step`` column: numeric columns are step
  metrics (rows whose ``rank`` is not 0 are skipped; string key columns such as ``split`` and
  ``model`` prefix the metric name);
- the trial's Parquet files and artifacts (tracebacks, plots) are run artifacts.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator.expand import flatten
from orchestrator.manifest import Manifest
from orchestrator.store import PARAM_FIELD_KEY, ExperimentStore

PARAM_BATCH = 100
METRIC_BATCH = 1000
STEP_TABLE_SUFFIXES = ("_steps", "_evals")
ID_COLUMNS = frozenset({"step", "rank", "epoch", "request_id", "t_s"})
KEY_COLUMNS = ("split", "model")  # string columns of step tables that prefix metric names
RUN_STATUS = {"done": "FINISHED", "failed": "FAILED", "timeout": "FAILED", "cancelled": "KILLED"}
TRIAL_TAG = "orch.trial_id"
STORE_TAG = "orch.store_id"  # the results folder a run belongs to (ExperimentStore.store_id)


def default_tracking_uri(results_root: Path | str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the results folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(results_root).resolve() / 'mlflow.db'}"


def _numeric(table: pa.Table) -> list[str]:
    return [
        f.name
        for f in table.schema
        if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        and f.name not in ID_COLUMNS
        and PARAM_FIELD_KEY not in (f.metadata or {})
    ]


def summary_metrics(table: pa.Table) -> dict[str, float]:
    """Numeric values of a one-row summary table."""
    out: dict[str, float] = {}
    if table.num_rows == 0:
        return out
    row = table.slice(0, 1).to_pylist()[0]
    for name in _numeric(table):
        value = row.get(name)
        if value is not None and value == value:  # skip nulls and NaN
            out[name] = float(value)
    return out


def step_metrics(table: pa.Table) -> list[tuple[str, float, int]]:
    """(key, value, step) triples of a steps/evals table."""
    if "step" not in table.column_names:
        return []
    numeric = _numeric(table)
    prefixes = [f.name for f in table.schema if pa.types.is_string(f.type) and f.name in KEY_COLUMNS]
    out: list[tuple[str, float, int]] = []
    for row in table.to_pylist():
        if row.get("rank") not in (None, 0):
            continue
        prefix = ".".join(str(row[p]) for p in prefixes if row.get(p) is not None)
        for name in numeric:
            value = row.get(name)
            if value is not None and value == value:
                out.append((f"{prefix}.{name}" if prefix else name, float(value), int(row["step"])))
    return out


class Tracker:
    """MLflow client for one experiment; ``available`` is False when MLflow cannot be reached."""

    def __init__(self, store: ExperimentStore, uri: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.store = store
        self.uri = uri or default_tracking_uri(store.root)
        self.error: str | None = None
        self.client: Any = None
        self.experiment_id: str | None = None
        try:
            self._connect()
        except Exception as exc:  # unreachable tracking must never cost results
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.client = None

    @property
    def available(self) -> bool:
        """Whether runs can be logged."""
        return self.client is not None

    def _connect(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            import httpx

            httpx.get(self.uri.rstrip("/") + "/health", timeout=3.0).raise_for_status()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.store.experiment)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:"):
                location = (self.store.root.resolve() / "mlartifacts" / self.store.experiment).as_uri()
            experiment_id = client.create_experiment(self.store.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.client, self.experiment_id = client, experiment_id

    def start_parent(self, submission: dict[str, Any]) -> str:
        """Create the parent run of a submission."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"submission-{submission['id']}",
            tags={"orch.submission_id": submission["id"], "orch.kind": submission.get("kind", ""),
                  STORE_TAG: self.store.store_id},
        )
        params = {f"orch.{k}": str(v)[:6000] for k, v in flatten(submission.get("versions", {})).items()}
        if submission.get("git"):
            params["orch.git"] = str(submission["git"])
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def has_run(self, run_id: str) -> bool:
        """Whether this store holds the run (deleted ones included: a parent is reused, not recreated)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def end_parent(self, run_id: str, status: str) -> None:
        """Close a parent run."""
        self.client.set_terminated(run_id, status=status)

    def existing_runs(self) -> dict[str, list[str]]:
        """trial id -> active child run ids already in this experiment from this results folder.

        Two folders may hold an experiment of the same name logged to one shared MLflow server (the
        same grid run on two machines): each sees, and replaces, only its own runs. Runs without
        the folder tag come from orch versions before it and count as this folder's."""
        out: dict[str, list[str]] = {}
        own = self.store.store_id
        page_token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` != ''", max_results=1000, page_token=page_token
            )
            for run in page:
                if run.data.tags.get(STORE_TAG, own) == own:
                    out.setdefault(run.data.tags[TRIAL_TAG], []).append(run.info.run_id)
            page_token = page.token
            if not page_token:
                return out

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
        """Log (key, value, step) triples in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, s) for k, v, s in metrics]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + METRIC_BATCH], synchronous=True)

    def start_live_run(self, trial_id: str, parent_run_id: str | None) -> str:
        """A running trial's run, for the metrics it streams; ``log_trial`` completes it."""
        tags = {TRIAL_TAG: trial_id, "orch.state": "running", STORE_TAG: self.store.store_id}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=trial_id, tags=tags).info.run_id

    def log_trial(self, trial_id: str, record: dict[str, Any], parent_run_id: str | None, stale_runs: list[str],
                  live_run_id: str | None = None) -> str:
        """Log one finished trial from the store (into its live run, if it streamed); replaces runs an
        interrupted attempt left."""
        for run_id in stale_runs:
            if run_id != live_run_id:
                self.client.delete_run(run_id)
        tags = {
            TRIAL_TAG: trial_id,
            STORE_TAG: self.store.store_id,
            "orch.state": record["state"],
            "orch.repeat": str(record.get("repeat", 0)),
            "orch.attempts": str(record.get("attempts", 0)),
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if record.get("error"):
            tags["orch.error"] = str(record["error"])[:5000]
        tags.update({f"orch.env.{k}": str(v)[:5000] for k, v in (record.get("environment") or {}).items() if v is not None})
        if live_run_id:
            run_id = live_run_id
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=trial_id, tags=tags).info.run_id
        self._log_params(run_id, {k: str(v)[:6000] for k, v in flatten(record.get("params", {})).items()})
        metrics: list[tuple[str, float, int]] = []
        files = self.store.trial_table_files(trial_id)
        for name in files:
            if name == "trials":
                continue
            table = self.store.read_trial_table(name, trial_id)
            if table is None:
                continue
            if name.endswith("_summary"):
                metrics.extend((k, v, 0) for k, v in summary_metrics(table).items())
            elif name.endswith(STEP_TABLE_SUFFIXES):
                metrics.extend((f"{name}/{k}", v, s) for k, v, s in step_metrics(table))
        for key in ("duration_s", "attempts"):
            if record.get(key) is not None:
                metrics.append((f"trial.{key}", float(record[key]), 0))
        self.log_metrics(run_id, metrics)
        for path in files.values():
            self.client.log_artifact(run_id, str(path), artifact_path="tables")
        artifacts = self.store.artifacts_dir(trial_id)
        if artifacts.is_dir() and any(artifacts.iterdir()):
            self.client.log_artifacts(run_id, str(artifacts))
        self.client.set_terminated(run_id, status=RUN_STATUS.get(record["state"], "FAILED"))
        return run_id


class BackgroundLogger:
    """Logs trials on a thread so the scheduler never waits for MLflow; results come back via ``drain``."""

    def __init__(self, tracker: Tracker, parent_run_id: str | None):
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        # (trial id, record) of a finished trial, or (None, live records) of running ones.
        self._todo: queue.Queue[tuple[str | None, Any] | None] = queue.Queue()
        self._live_runs: dict[str, str] = {}
        self._finished: set[str] = set()
        self._done: queue.Queue[tuple[str, str | None, str | None]] = queue.Queue()
        self._existing: dict[str, list[str]] | None = None
        self._thread = threading.Thread(target=self._work, name="orch-mlflow", daemon=True)
        self._thread.start()

    def submit(self, trial_id: str, record: dict[str, Any]) -> None:
        """Queue a terminal trial for logging."""
        self._todo.put((trial_id, dict(record)))

    def submit_live(self, records: list[tuple[str, int, dict[str, float]]]) -> None:
        """Queue running trials' (trial id, step, metrics) records; logged as ``live/<key>`` step metrics."""
        if records:
            self._todo.put((None, list(records)))

    def _log_live(self, records: list[tuple[str, int, dict[str, float]]]) -> None:
        by_trial: dict[str, list[tuple[str, float, int]]] = {}
        for trial_id, step, metrics in records:
            if trial_id not in self._finished:
                by_trial.setdefault(trial_id, []).extend((f"live/{k}", v, step) for k, v in metrics.items())
        for trial_id, metrics in by_trial.items():
            try:
                if trial_id not in self._live_runs:
                    self._live_runs[trial_id] = self.tracker.start_live_run(trial_id, self.parent_run_id)
                self.tracker.log_metrics(self._live_runs[trial_id], metrics)
            except Exception:  # live metrics are best effort; the trial is logged in full at its end
                continue

    def _work(self) -> None:
        while (item := self._todo.get()) is not None:
            trial_id, record = item
            if trial_id is None:
                self._log_live(record)
                continue
            self._finished.add(trial_id)
            try:
                if self._existing is None:
                    self._existing = self.tracker.existing_runs()
                stale = self._existing.pop(trial_id, [])
                run_id = self.tracker.log_trial(trial_id, record, self.parent_run_id, stale, self._live_runs.pop(trial_id, None))
                self._done.put((trial_id, run_id, None))
            except Exception as exc:  # keep going: the trial stays unsynced for `orch sync`
                self._done.put((trial_id, None, f"{type(exc).__name__}: {exc}"[:300]))

    def drain(self) -> list[tuple[str, str | None, str | None]]:
        """(trial id, run id or None, error or None) for trials logged since the last call."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout_s: float = 600.0) -> list[tuple[str, str | None, str | None]]:
        """Finish the queue and return the remaining results."""
        self._todo.put(None)
        self._thread.join(timeout_s)
        return self.drain()


def sync_experiment(tracker: Tracker, manifest: Manifest) -> int:
    """Log every finished trial of an experiment that this tracking store lacks (``orch sync``):
    unsynced ones, and synced ones whose run is not there (a lost or new store); returns how many."""
    existing = tracker.existing_runs()
    lost = [(tid, e) for tid, e in manifest.trials.items()
            if e.get("synced") and e.get("mlflow_run_id") not in existing.get(tid, [])]
    todo = manifest.unsynced() + lost
    parents: dict[int, str | None] = {}
    for trial_id, entry in todo:
        index = entry.get("submission", len(manifest.submissions) - 1)
        submission = manifest.submissions[index]
        if index not in parents:
            if not submission.get("parent_run_id") or not tracker.has_run(submission["parent_run_id"]):
                submission["parent_run_id"] = tracker.start_parent(submission)
                tracker.end_parent(submission["parent_run_id"], "FINISHED")
            parents[index] = submission["parent_run_id"]
        duration = entry["end_s"] - entry["start_s"] if entry.get("end_s") and entry.get("start_s") else None
        run_id = tracker.log_trial(trial_id, dict(entry, duration_s=duration), parents[index], existing.pop(trial_id, []))
        manifest.update(trial_id, synced=True, mlflow_run_id=run_id, sync_error=None)
        manifest.save(force=True)
    return len(todo)
