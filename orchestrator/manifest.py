"""An experiment's manifest: trial states, attempts and errors, and the submissions that ran them.

``results/<experiment>/manifest.json`` is the record ``orch status``, ``ls``, ``sync``, ``cancel``
and ``report`` read, and only a running driver writes. Saving is atomic and throttled: Parquet is
always written before an entry says ``done``, so a manifest that lags only means a trial reruns.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

from orchestrator.expand import Trial
from orchestrator.store import STATES, TERMINAL_STATES, ExperimentStore

SAVE_EVERY_S = 0.5
FORMAT = 1


class TrialEntry(TypedDict, total=False):
    """One trial's record (JSON object under ``trials``)."""

    state: str  # queued | running | done | failed | timeout | cancelled
    attempts: int
    repeat: int
    params: dict[str, Any]
    axes: dict[str, Any]
    resources: dict[str, float]  # the grid's per-trial resources it ran with
    node: str | None
    start_s: float | None
    end_s: float | None
    error: str | None
    synced: bool
    sync_error: str | None
    mlflow_run_id: str | None
    submission: int  # index into ``submissions``
    environment: dict[str, Any]


class Manifest:
    """The manifest of one experiment, with state changes, counts and throttled saving."""

    def __init__(self, store: ExperimentStore, data: dict[str, Any]):
        self.store = store
        self.data = data
        self._saved_at = 0.0
        self._dirty = False

    @classmethod
    def load(cls, store: ExperimentStore) -> Manifest | None:
        """The experiment's manifest, or None when it was never submitted."""
        data = store.load_manifest()
        return None if data is None else cls(store, data)

    @classmethod
    def load_or_new(cls, store: ExperimentStore) -> Manifest:
        """The experiment's manifest, or an empty one."""
        return cls.load(store) or cls(store, {"format": FORMAT, "experiment": store.experiment, "trials": {}})

    # -- reading ---------------------------------------------------------------------------
    @property
    def trials(self) -> dict[str, TrialEntry]:
        """trial id -> entry."""
        return self.data.setdefault("trials", {})

    @property
    def submissions(self) -> list[dict[str, Any]]:
        """Every submission, oldest first."""
        return self.data.setdefault("submissions", [])

    @property
    def kind(self) -> str:
        """The experiment's trial kind ('' if unknown)."""
        return self.data.get("kind") or ""

    @property
    def axes(self) -> list[str]:
        """The grid's varied dotted keys."""
        return list(self.data.get("axes") or [])

    def entry(self, trial_id: str) -> TrialEntry:
        """One trial's entry."""
        return self.trials[trial_id]

    def last_submission(self) -> dict[str, Any]:
        """The latest submission ({} if none)."""
        return self.submissions[-1] if self.submissions else {}

    def running_submissions(self) -> list[dict[str, Any]]:
        """Submissions recorded as running (their driver may have died since)."""
        return [s for s in self.submissions if s.get("status") == "running"]

    def counts(self, trial_ids: list[str] | None = None) -> dict[str, int]:
        """Trials by state (every state present, zeros included)."""
        out = dict.fromkeys(STATES, 0)
        for trial_id in self.trials if trial_ids is None else trial_ids:
            state = self.trials[trial_id].get("state", "queued")
            out[state] = out.get(state, 0) + 1
        return out

    def unsynced(self) -> list[tuple[str, TrialEntry]]:
        """Trials in a terminal state that are not logged to MLflow yet."""
        return [(tid, e) for tid, e in self.trials.items() if e.get("state") in TERMINAL_STATES and not e.get("synced")]

    # -- changing --------------------------------------------------------------------------
    def queue(self, trials: list[Trial], submission: int) -> tuple[list[Trial], list[Trial]]:
        """Enter every trial not yet done as ``queued`` for submission number ``submission``; returns
        those, and the done trials that ran with other resources than the grid now gives them.

        A trial that ran before keeps its attempt count and MLflow run (a rerun logs into the same run).
        Resources are not part of a trial's id (a grid moved to a bigger machine resumes), so a done
        trial is kept even when they changed; the caller says so.
        """
        queued, other_resources = [], []
        for trial in trials:
            previous = self.trials.get(trial.trial_id)
            if previous is not None and previous.get("state") == "done":
                if previous.get("resources", trial.resources) != trial.resources:
                    other_resources.append(trial)
                continue
            previous = previous or {}
            self.trials[trial.trial_id] = {
                "state": "queued", "attempts": previous.get("attempts", 0), "repeat": trial.repeat,
                "params": trial.params, "axes": trial.axes, "resources": trial.resources, "node": None,
                "start_s": None, "end_s": None, "error": None, "synced": False,
                "mlflow_run_id": previous.get("mlflow_run_id"), "submission": submission,
            }
            queued.append(trial)
        return queued, other_resources

    def update(self, trial_id: str, **fields: Any) -> TrialEntry:
        """Change fields of one entry (saved at the next ``save``)."""
        entry = self.trials[trial_id]
        entry.update(fields)  # type: ignore[typeddict-item]
        self._dirty = True
        return entry

    def mark_dirty(self) -> None:
        """Note a change made to ``data`` directly."""
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """Whether changes wait to be saved."""
        return self._dirty

    def save(self, force: bool = False) -> None:
        """Write at most every ``SAVE_EVERY_S`` unless forced."""
        self._dirty = True
        now = time.time()
        if force or now - self._saved_at >= SAVE_EVERY_S:
            self.store.save_manifest(self.data)
            self._saved_at, self._dirty = now, False

    def flush(self) -> None:
        """Write pending changes now."""
        if self._dirty:
            self.save(force=True)
