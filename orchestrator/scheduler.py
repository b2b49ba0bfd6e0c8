"""Placing trials on Ray: admission by resources, actor reuse, retries, timeouts, resume.

The driver keeps a pool of runner actors. A trial is admitted when its footprint fits in the
cluster's free resources; it goes to an idle actor of the same resource shape (preferring one
whose open session belongs to the trial's engine group), else to a new actor. Results come
back through the object store; only this process writes Parquet, the manifest and MLflow.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from orchestrator import provenance
from orchestrator.expand import Trial, flatten, resolve_paths
from orchestrator.live import LiveChannel
from orchestrator.runner import TrialJob, TrialResult, TrialRunner
from orchestrator.spec import GridSpec
from orchestrator.store import TERMINAL_STATES, ExperimentStore, ParamColumns, atomic_write_bytes
from orchestrator.telemetry import Telemetry
from orchestrator.tracking import BackgroundLogger, Tracker
from workloads.kind import TrialKind

RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
EPS = 1e-9
MANIFEST_EVERY_S = 0.5


class Progress(Protocol):
    """Receives the submission's progress (terminal display, logs, tests)."""

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None: ...

    def event(self, message: str) -> None: ...


class SilentProgress:
    """Progress sink that shows nothing."""

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None:
        """Ignore."""

    def event(self, message: str) -> None:
        """Ignore."""


def ray_resources(resources: dict[str, float]) -> dict[str, float]:
    """Grid resource names -> Ray's names (num_cpus -> CPU, ...), zeros dropped."""
    return {RAY_RESOURCE_NAMES.get(k, k): float(v) for k, v in resources.items() if v}


def actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """``.options()`` arguments that give an actor exactly these resources."""
    custom = {k: v for k, v in resources.items() if k not in RAY_RESOURCE_NAMES and v}
    options: dict[str, Any] = {
        "num_cpus": resources.get("num_cpus", 0.0),
        "num_gpus": resources.get("num_gpus", 0.0),
        "max_restarts": 0,
        "max_concurrency": 2,  # run() plus where()/shutdown() while a trial is running
    }
    if resources.get("memory"):
        options["memory"] = resources["memory"]
    if custom:
        options["resources"] = custom
    return options


@dataclass
class Slot:
    """One runner actor and what it is doing."""

    actor: Any
    shape: tuple[tuple[str, float], ...]
    session_key: str | None = None
    trial: Trial | None = None
    ref: Any = None
    started: float = 0.0
    footprint: dict[str, float] = field(default_factory=dict)
    # Resolves once the actor process is up; a trial's timeout counts from then, not from the
    # (possibly slow) start of a new worker process.
    ready_ref: Any = None
    node: str | None = None  # Ray node id, known once the actor is up


@dataclass
class Outcome:
    """How a submission ended."""

    counts: dict[str, int]
    interrupted: bool
    tracking_error: str | None


class Submission:
    """Runs one grid's trials to completion (or interruption) and records everything."""

    def __init__(
        self,
        spec: GridSpec,
        kind: TrialKind,
        trials: list[Trial],
        store: ExperimentStore,
        tracker: Tracker | None,
        progress: Progress | None = None,
        grid_file: str | None = None,
        refresh_s: float = 1.0,
    ):
        self.spec = spec
        self.kind = kind
        self.trials = {t.trial_id: t for t in trials}
        self.store = store
        self.tracker = tracker
        self.progress = progress or SilentProgress()
        self.grid_file = grid_file
        self.refresh_s = refresh_s
        self.param_columns = ParamColumns.from_params([flatten(t.params) for t in trials])
        self.slots: list[Slot] = []
        self.pending: deque[Trial] = deque()
        self.attempts: dict[str, int] = {}
        self.telemetry = Telemetry(spec.experiment)
        self.manifest: dict[str, Any] = {}
        self.submission: dict[str, Any] = {}
        self.logger: BackgroundLogger | None = None
        self.live: LiveChannel | None = None
        self._durations: list[float] = []
        self._footprints: dict[str, dict[str, float]] = {}
        self._capacity_cache: dict[str, float] = {}
        self._capacity_at = 0.0
        self._manifest_saved_at = 0.0
        self._cwd = Path.cwd()
        self._manifest_dirty = False
        self._start = time.time()
        self._runner_cls = ray.remote(TrialRunner)

    # -- manifest --------------------------------------------------------------------------
    def _open_manifest(self) -> None:
        manifest = self.store.load_manifest() or {"format": 1, "experiment": self.spec.experiment, "trials": {}}
        manifest["kind"] = self.spec.kind
        manifest["spec"] = self.spec.model_dump(mode="json")
        manifest["axes"] = self.spec.axes
        manifest["grid_file"] = self.grid_file
        self.submission = {
            "id": time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
            "started_at": time.time(),
            "status": "running",
            "pid": os.getpid(),
            "kind": self.spec.kind,
            "versions": provenance.package_versions(),
            "git": provenance.git_revision(),
            "hardware": provenance.hardware(),
            "tracking_uri": self.tracker.uri if self.tracker else None,
            "parent_run_id": None,
        }
        manifest.setdefault("submissions", []).append(self.submission)
        index = len(manifest["submissions"]) - 1
        for trial in self.trials.values():
            entry = manifest["trials"].get(trial.trial_id)
            if entry is None or entry.get("state") != "done":
                previous = entry or {}
                manifest["trials"][trial.trial_id] = {
                    "state": "queued",
                    "attempts": previous.get("attempts", 0),
                    "repeat": trial.repeat,
                    "params": trial.params,
                    "axes": trial.axes,
                    "node": None,
                    "start_s": None,
                    "end_s": None,
                    "error": None,
                    "synced": False,
                    "mlflow_run_id": previous.get("mlflow_run_id"),
                    "submission": index,
                }
                self.pending.append(trial)
        self.manifest = manifest
        self.pending = deque(sorted(self.pending, key=lambda t: (t.group_key, t.index)))
        self._save(force=True)

    def _save(self, force: bool = False) -> None:
        """Write the manifest at most every ``MANIFEST_EVERY_S`` unless forced.

        Lagging is safe: Parquet is always written before the manifest can say `done`, so a
        crash between the two only means the trial reruns on resume (and overwrites its files).
        """
        self._manifest_dirty = True
        now = time.time()
        if force or now - self._manifest_saved_at >= MANIFEST_EVERY_S:
            self.store.save_manifest(self.manifest)
            self._manifest_saved_at, self._manifest_dirty = now, False

    def _flush(self) -> None:
        if self._manifest_dirty:
            self._save(force=True)

    def _entry(self, trial_id: str) -> dict[str, Any]:
        return self.manifest["trials"][trial_id]

    # -- tracking --------------------------------------------------------------------------
    def _start_tracking(self) -> None:
        if self.tracker is None or not self.tracker.available:
            if self.tracker is not None:
                self.progress.event(f"MLflow unreachable ({self.tracker.error}); results go to Parquet, run `orch sync` later")
            return
        try:
            self.submission["parent_run_id"] = self.tracker.start_parent(self.submission)
        except Exception as exc:  # tracking trouble never costs results
            self.progress.event(f"MLflow parent run failed: {exc}")
            return
        self.logger = BackgroundLogger(self.tracker, self.submission["parent_run_id"])
        for trial_id, entry in self.manifest["trials"].items():
            if entry.get("state") in TERMINAL_STATES and not entry.get("synced"):
                self.logger.submit(trial_id, entry)

    def _collect_tracking(self, results: list[tuple[str, str | None, str | None]]) -> None:
        changed = False
        for trial_id, run_id, error in results:
            entry = self.manifest["trials"].get(trial_id)
            if entry is None:
                continue
            entry["synced"] = run_id is not None
            entry["mlflow_run_id"] = run_id or entry.get("mlflow_run_id")
            entry["sync_error"] = error
            changed = True
        if changed:
            self._save()

    # -- capacity ---------------------------------------------------------------------------
    def _capacity(self) -> dict[str, float]:
        """Cluster totals, re-read every ``refresh_s`` (nodes come and go)."""
        now = time.time()
        if now - self._capacity_at >= self.refresh_s:
            self._capacity_cache = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            self._capacity_at = now
        return self._capacity_cache

    def _used(self) -> dict[str, float]:
        """Resources held: running trials' footprints plus what idle actors reserve."""
        used: dict[str, float] = {}
        for slot in self.slots:
            held = slot.footprint if slot.trial is not None else ray_resources(dict(slot.shape))
            for key, value in held.items():
                used[key] = used.get(key, 0.0) + value
        return used

    @staticmethod
    def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
        return all(free.get(k, 0.0) + EPS >= v for k, v in need.items())

    # -- running -----------------------------------------------------------------------------
    def _footprint(self, trial: Trial) -> dict[str, float]:
        if trial.trial_id not in self._footprints:
            params = self.kind.params_model.model_validate(trial.params)
            self._footprints[trial.trial_id] = ray_resources(self.kind.footprint(params, trial.resources))
        return self._footprints[trial.trial_id]

    def _actor_resources(self, trial: Trial) -> dict[str, float]:
        params = self.kind.params_model.model_validate(trial.params)
        return self.kind.actor_resources(params, trial.resources)

    def _idle_slot(self, trial: Trial, shape: tuple[tuple[str, float], ...]) -> Slot | None:
        """An idle actor of this shape, preferring one whose session is the trial's engine group."""
        idle = [s for s in self.slots if s.trial is None and s.shape == shape]
        for slot in idle:
            if slot.session_key == trial.group_key:
                return slot
        return idle[0] if idle else None

    def _new_slot(self, shape: tuple[tuple[str, float], ...]) -> Slot:
        actor = self._runner_cls.options(**actor_options(dict(shape))).remote()
        slot = Slot(actor=actor, shape=shape, ready_ref=actor.where.remote())
        self.slots.append(slot)
        return slot

    def _release(self, slot: Slot, kill: bool = True) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
        if kill:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead
                pass

    def _launch(self, trial: Trial, slot: Slot, footprint: dict[str, float]) -> None:
        self.attempts[trial.trial_id] = self.attempts.get(trial.trial_id, 0) + 1
        entry = self._entry(trial.trial_id)
        entry["attempts"] = entry.get("attempts", 0) + 1
        entry["state"] = "running"
        entry["start_s"] = time.time()
        entry["end_s"] = None
        entry["error"] = None
        entry["node"] = slot.node
        job = TrialJob(
            experiment=self.spec.experiment,
            kind=self.spec.kind,
            trial_id=trial.trial_id,
            repeat=trial.repeat,
            attempt=self.attempts[trial.trial_id],
            params=resolve_paths(trial.params, self.kind.path_keys, self._cwd),
            resources=trial.resources,
            group_key=trial.group_key,
            workdir=str(self.store.workdir(trial.trial_id).resolve()),
            report=self.live.reporter(trial.trial_id) if self.live else None,
        )
        slot.trial, slot.started, slot.footprint = trial, time.time(), footprint
        slot.session_key = trial.group_key
        slot.ref = slot.actor.run.remote(job)

    def _admit(self) -> None:
        capacity = self._capacity()
        used = self._used()
        free = {k: capacity.get(k, 0.0) - used.get(k, 0.0) for k in set(capacity) | set(used)}
        launched = False
        for trial in list(self.pending):
            need = self._footprint(trial)
            if not self._fits(need, capacity):
                self.pending.remove(trial)
                missing = {k: v for k, v in need.items() if capacity.get(k, 0.0) + EPS < v}
                self._finish_without_result(
                    trial, "failed", f"needs {missing} but the cluster has {({k: capacity.get(k, 0.0) for k in missing})}"
                )
                continue
            shape = tuple(sorted(self._actor_resources(trial).items()))
            slot = self._idle_slot(trial, shape)
            # Reusing an idle actor reuses what it reserves; a new actor needs the whole footprint.
            reserved = ray_resources(dict(shape)) if slot is not None else {}
            extra = {k: v - reserved.get(k, 0.0) for k, v in need.items()}
            if slot is None and not self._fits(extra, free):
                idle = [s for s in self.slots if s.trial is None]
                freed = dict(free)
                for other in idle:
                    for key, value in ray_resources(dict(other.shape)).items():
                        freed[key] = freed.get(key, 0.0) + value
                if not idle or not self._fits(extra, freed):
                    continue
                for other in idle:  # idle actors of other shapes give their reservations back
                    self._release(other)
                free = freed
            if not self._fits(extra, free):
                continue
            self.pending.remove(trial)
            self._launch(trial, slot or self._new_slot(shape), need)
            launched = True
            for key, value in extra.items():
                free[key] = free.get(key, 0.0) - value
        if launched:
            self._save()

    def _running_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.trial is not None]

    def _handle_ready(self, slot: Slot) -> None:
        trial = slot.trial
        assert trial is not None
        try:
            result: TrialResult = ray.get(slot.ref)
        except RayTaskError as exc:  # the runner itself broke (e.g. an unpicklable result)
            slot.trial = None
            self._release(slot)
            self._finish_without_result(trial, "failed", f"runner error: {str(exc).splitlines()[0][:300]}")
            return
        except RayError as exc:  # actor or node died: retry elsewhere
            slot.trial = None
            self._release(slot, kill=False)
            self._capacity_at = 0.0  # the cluster may have lost a node: re-read its resources
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if self.attempts.get(trial.trial_id, 0) <= self.spec.retries:
                entry = self._entry(trial.trial_id)
                entry["state"], entry["error"] = "queued", f"retrying after {reason}"
                self.pending.appendleft(trial)
                self.progress.event(f"trial {trial.trial_id} lost its worker ({reason}); retrying")
                self._save()
            else:
                self._finish_without_result(trial, "failed", f"worker died {self.attempts[trial.trial_id]} times: {reason}")
            return
        slot.trial = None
        self._record(trial, result)

    def _mark_ready(self) -> None:
        waiting = [s for s in self._running_slots() if s.ready_ref is not None]
        if not waiting:
            return
        ready, _ = ray.wait([s.ready_ref for s in waiting], num_returns=len(waiting), timeout=0)
        ready_set = set(ready)
        for slot in waiting:
            if slot.ready_ref in ready_set:
                try:
                    slot.node = ray.get(slot.ready_ref)["node"]
                except RayError:  # died while starting: its run() result reports that
                    slot.node = None
                slot.ready_ref, slot.started = None, time.time()
                if slot.trial is not None:
                    self._entry(slot.trial.trial_id)["node"] = slot.node
                    self._save()

    def _check_timeouts(self) -> None:
        if self.spec.timeout_s is None:
            return
        now = time.time()
        for slot in self._running_slots():
            if slot.ready_ref is None and now - slot.started > self.spec.timeout_s:
                trial = slot.trial
                assert trial is not None
                slot.trial = None
                self._release(slot)
                self._finish_without_result(trial, "timeout", f"exceeded timeout_s={self.spec.timeout_s:g}")

    # -- recording -----------------------------------------------------------------------------
    def _params_for(self, trial: Trial) -> list:
        return self.param_columns.columns(flatten(trial.params), taken=set())

    def _record(self, trial: Trial, result: TrialResult) -> None:
        """Write a finished attempt: Parquet first, then the manifest, then MLflow (async)."""
        params = self._params_for(trial)
        if result.state == "done":
            try:
                for name, table in result.tables.items():
                    schema = self.kind.tables.get(name)
                    self.store.write_table(name, trial.trial_id, table, schema, params if name.endswith("_summary") else None)
            except Exception as exc:  # a table that does not fit its schema fails the trial, not the grid
                result.state, result.error = "failed", f"could not store results: {type(exc).__name__}: {exc}"[:500]
        artifacts = self.store.artifacts_dir(trial.trial_id)
        for name, data in result.artifacts.items():
            atomic_write_bytes(artifacts / name, data)
        if result.traceback:
            atomic_write_bytes(artifacts / "traceback.txt", result.traceback.encode())
        self._finish(trial, result.state, result.error, node=result.node, start=result.start_s, end=result.end_s)

    def _finish_without_result(self, trial: Trial, state: str, error: str) -> None:
        entry = self._entry(trial.trial_id)
        now = time.time()
        if state in ("failed", "timeout"):
            atomic_write_bytes(self.store.artifacts_dir(trial.trial_id) / "error.txt", error.encode())
        self._finish(trial, state, error, node=entry.get("node"), start=entry.get("start_s") or now, end=now)

    def _finish(self, trial: Trial, state: str, error: str | None, node: str | None, start: float, end: float) -> None:
        entry = self._entry(trial.trial_id)
        entry.update(state=state, error=error, node=node, start_s=start, end_s=end, synced=False)
        record = dict(entry, duration_s=end - start)
        self.store.write_trial_row(trial.trial_id, record, self._params_for(trial))
        self._save()
        if state == "done":
            self._durations.append(end - start)
        self.progress.event(f"{state:<9} {trial.trial_id} {_axes_text(trial.axes)} ({end - start:.1f}s){': ' + error if error else ''}")
        self.telemetry.trial_finished(state, end - start)
        if self.logger is not None:
            self.logger.submit(trial.trial_id, record)

    # -- main loop ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Trials of this grid by state."""
        out = {state: 0 for state in ("done", "running", "failed", "timeout", "cancelled", "queued")}
        for trial_id in self.trials:
            state = self._entry(trial_id)["state"]
            out[state] = out.get(state, 0) + 1
        return out

    def _eta(self, counts: dict[str, int]) -> float | None:
        if not self._durations:
            return None
        remaining = counts["queued"] + counts["running"]
        parallel = max(1, counts["running"])
        return sum(self._durations) / len(self._durations) * remaining / parallel

    def run(self, poll_s: float = 0.05) -> Outcome:
        """Run every pending trial; Ctrl-C cancels the running ones and records them."""
        self._open_manifest()
        self._start_tracking()
        self.live = LiveChannel(self.spec.experiment)
        interrupted = False
        try:
            while self.pending or self._running_slots():
                if self.pending:
                    self._admit()
                running = self._running_slots()
                if running:
                    refs = [s.ref for s in running]
                    ready, _ = ray.wait(refs, num_returns=1, timeout=poll_s)
                    if ready:  # collect every result that is in, not just the first
                        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    ready_set = set(ready)
                    for slot in [s for s in running if s.ref in ready_set]:
                        self._handle_ready(slot)
                    self._mark_ready()
                    self._check_timeouts()
                if self.logger is not None:
                    self.logger.submit_live(self.live.poll())
                    self._collect_tracking(self.logger.drain())
                if self._manifest_dirty:
                    self._save()
                counts = self.counts()
                self.telemetry.update(counts)
                self.progress.update(counts, time.time() - self._start, self._eta(counts))
        except KeyboardInterrupt:
            interrupted = True
            self._cancel_running()
        finally:
            self._shutdown_actors()
            self.submission["status"] = "interrupted" if interrupted else "finished"
            self.submission["ended_at"] = time.time()
            self._save(force=True)
            live = self.live.close()
            if self.logger is not None:
                self.logger.submit_live(live)
            tracking_error = self._close_tracking(interrupted)
        counts = self.counts()
        self.progress.update(counts, time.time() - self._start, 0.0)
        return Outcome(counts=counts, interrupted=interrupted, tracking_error=tracking_error)

    def _cancel_running(self) -> None:
        for slot in self._running_slots():
            trial = slot.trial
            assert trial is not None
            slot.trial = None
            self._release(slot)
            self._finish_without_result(trial, "cancelled", "cancelled by the user")
        for trial in list(self.pending):
            self._entry(trial.trial_id)["state"] = "queued"
        self.pending.clear()

    def _shutdown_actors(self) -> None:
        for slot in list(self.slots):
            try:
                ray.get(slot.actor.shutdown.remote(), timeout=10)
            except (GetTimeoutError, RayError):
                pass
            self._release(slot)

    def _close_tracking(self, interrupted: bool) -> str | None:
        if self.logger is None:
            return self.tracker.error if self.tracker else None
        self._collect_tracking(self.logger.close())
        self._flush()
        try:
            self.tracker.end_parent(self.submission["parent_run_id"], "KILLED" if interrupted else "FINISHED")
        except Exception as exc:  # the runs are logged; only the parent's status is missing
            return str(exc)
        return None


def _axes_text(axes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in axes.items())
