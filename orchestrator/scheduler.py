"""The driver's main loop: admit trials, start them once their resources are reserved, record outcomes.

A trial is admitted when its footprint fits the cluster's free resources (by the driver's own
books, ``admission.py``); it gets an idle runner actor of its shape or a new one in a placement
group of its own (``placement.py``), and starts once the actor is up and its workers' bundles are reserved;
its ``timeout_s`` counts from then. A trial that no node can hold is refused before anything
runs; one that stops fitting (a node left) fails after ``placement_wait_s``. Results come back
through the object store; only this process writes Parquet, the manifest and MLflow.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from orchestrator import provenance
from orchestrator.admission import PLACEMENT_WAIT_S, Admission
from orchestrator.expand import Trial, flatten, resolve_paths
from orchestrator.live import LiveChannel
from orchestrator.manifest import Manifest
from orchestrator.placement import ActorPool, Slot, TrialNeeds, release, reserve
from orchestrator.progress import Progress, SilentProgress
from orchestrator.runner import TrialJob, TrialResult, TrialRunner
from orchestrator.spec import GridSpec
from orchestrator.store import ExperimentStore, ParamColumns, atomic_write_bytes
from orchestrator.telemetry import Telemetry
from orchestrator.tracking import BackgroundLogger, Tracker
from workloads.kind import TrialKind


@dataclass
class Outcome:
    """How a submission ended."""

    counts: dict[str, int]
    interrupted: bool
    tracking_error: str | None
    error: str | None = None  # an error outside any trial ended the submission (status `failed`)


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
        placement_wait_s: float = PLACEMENT_WAIT_S,
    ):
        self.spec = spec
        self.kind = kind
        self.trials = {t.trial_id: t for t in trials}
        self.store = store
        self.tracker = tracker
        self.progress = progress or SilentProgress()
        self.grid_file = grid_file
        self.param_columns = ParamColumns.from_params([flatten(t.params) for t in trials])
        self.pool = ActorPool(ray.remote(TrialRunner), spec.kind)
        self.admission = Admission(kind, self.pool, refresh_s, placement_wait_s)
        self.pending: deque[Trial] = deque()
        self.attempts: dict[str, int] = {}
        self.telemetry = Telemetry(spec.experiment)
        self.manifest = Manifest.load_or_new(store)
        self.submission: dict[str, Any] = {}
        self.logger: BackgroundLogger | None = None
        self.live: LiveChannel | None = None
        self._durations: list[float] = []
        self._cwd = Path.cwd()
        self._start = time.time()

    # -- manifest --------------------------------------------------------------------------
    def _open_manifest(self) -> None:
        data = self.manifest.data
        data["kind"] = self.spec.kind
        data["spec"] = self.spec.model_dump(mode="json")
        data["axes"] = self.spec.axes
        data["grid_file"] = self.grid_file
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
        self.manifest.submissions.append(self.submission)
        queued, other_resources = self.manifest.queue(list(self.trials.values()), len(self.manifest.submissions) - 1)
        if other_resources:
            before = self.manifest.trials[other_resources[0].trial_id].get("resources")
            self.progress.event(
                f"{len(other_resources)} done trial(s) ran with other resources ({_resources_text(before)}, now "
                f"{_resources_text(other_resources[0].resources)}); they are kept, not rerun: submit under a new "
                "experiment name to measure them again")
        self.pending = deque(sorted(queued, key=lambda t: (t.group_key, t.index)))
        self.manifest.save(force=True)

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
        for trial_id, entry in self.manifest.unsynced():
            self.logger.submit(trial_id, entry)

    def _collect_tracking(self, results: list[tuple[str, str | None, str | None]]) -> None:
        for trial_id, run_id, error in results:
            entry = self.manifest.trials.get(trial_id)
            if entry is not None:
                self.manifest.update(trial_id, synced=run_id is not None, sync_error=error,
                                     mlflow_run_id=run_id or entry.get("mlflow_run_id"))

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> None:
        def fail(trial: Trial, error: str) -> None:
            self.pending.remove(trial)
            self._finish_without_result(trial, "failed", error)

        def assign(trial: Trial, slot: Slot, needs: TrialNeeds) -> None:
            self.pending.remove(trial)
            self._assign(trial, slot, needs)

        self.admission.admit(self.pending, assign, fail)

    def _assign(self, trial: Trial, slot: Slot, needs: TrialNeeds) -> None:
        """Give a trial its actor and reserve its workers; it starts once both are ready."""
        self.attempts[trial.trial_id] = self.attempts.get(trial.trial_id, 0) + 1
        entry = self.manifest.entry(trial.trial_id)
        self.manifest.update(trial.trial_id, attempts=entry.get("attempts", 0) + 1, state="running", start_s=None,
                             end_s=None, error=None, node=slot.node)
        slot.trial, slot.needs, slot.waiting_since, slot.ref = trial, needs, time.monotonic(), None
        slot.workers = reserve(needs.workers)
        slot.workers_ready = slot.workers.ready() if slot.workers is not None else None
        self.manifest.save()

    def _start_reserved(self) -> None:
        """Start every assigned trial whose actor is up and whose workers are reserved."""
        waiting = [s for s in self.pool.running() if s.ref is None and s.ready_ref is None]
        pending_refs = [s.workers_ready for s in waiting if s.workers_ready is not None]
        ready = set(ray.wait(pending_refs, num_returns=len(pending_refs), timeout=0)[0]) if pending_refs else set()
        now = time.monotonic()
        for slot in waiting:
            if slot.workers_ready is None or slot.workers_ready in ready:
                self._launch(slot)
        for slot in [s for s in self.pool.running() if s.ref is None]:
            trial = slot.trial
            assert trial is not None
            error = self.admission.unplaceable_error(trial, slot.waiting_since, now)
            if error:
                self.pool.discard(slot)
                self._finish_without_result(trial, "failed", error)

    def _launch(self, slot: Slot) -> None:
        trial = slot.trial
        assert trial is not None
        # Ray Train reserves its workers in a group of its own: hand ours over now (the driver
        # keeps counting them as this slot's until the trial ends).
        release(slot.workers)
        slot.workers = slot.workers_ready = None
        slot.started, slot.started_clock = time.time(), time.monotonic()
        slot.session_key = trial.group_key
        self.manifest.update(trial.trial_id, start_s=slot.started, node=slot.node)
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
            git_commit=self.submission.get("git"),
            report=self.live.reporter(trial.trial_id) if self.live else None,
        )
        slot.ref = slot.actor.run.remote(job)

    # -- results -----------------------------------------------------------------------------
    def _wait(self, poll_s: float) -> None:
        """Collect finished trials (waiting up to ``poll_s`` for the first) and actors that came up."""
        started = [s for s in self.pool.running() if s.ref is not None]
        refs = [s.ref for s in started]
        others = [s.ready_ref for s in self.pool.slots if s.ready_ref is not None]
        others += [s.workers_ready for s in self.pool.slots if s.workers_ready is not None]
        if not refs and not others:
            time.sleep(poll_s)
            return
        first, _ = ray.wait(refs + others, num_returns=1, timeout=poll_s)
        if first and refs:  # collect every result that is in, not just the first
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
            for slot in [s for s in started if s.ref in ready]:
                self._handle_ready(slot)
        self._mark_ready()

    def _handle_ready(self, slot: Slot) -> None:
        trial = slot.trial
        assert trial is not None
        try:
            result: TrialResult = ray.get(slot.ref)
        except RayTaskError as exc:  # the runner itself broke (e.g. an unpicklable result)
            self.pool.discard(slot)
            self._finish_without_result(trial, "failed", f"runner error: {str(exc).splitlines()[0][:300]}")
            return
        except RayError as exc:  # actor or node died: retry elsewhere
            self._lost_worker(slot, exc)
            return
        slot.trial = slot.needs = slot.ref = None
        self._record(trial, result)

    def _lost_worker(self, slot: Slot, exc: Exception) -> None:
        trial = slot.trial
        assert trial is not None
        self.pool.discard(slot, kill=False)
        self.admission.cluster.invalidate()  # the cluster may have lost a node: re-read its resources
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if self.attempts.get(trial.trial_id, 0) <= self.spec.retries:
            self.manifest.update(trial.trial_id, state="queued", error=f"retrying after {reason}")
            self.pending.appendleft(trial)
            self.progress.event(f"trial {trial.trial_id} lost its worker ({reason}); retrying")
            self.manifest.save()
        else:
            self._finish_without_result(trial, "failed", f"worker died {self.attempts[trial.trial_id]} times: {reason}")

    def _mark_ready(self) -> None:
        """Note the node of every actor that came up; an actor that died starting loses its trial."""
        waiting = [s for s in self.pool.slots if s.ready_ref is not None]
        if not waiting:
            return
        ready = set(ray.wait([s.ready_ref for s in waiting], num_returns=len(waiting), timeout=0)[0])
        for slot in waiting:
            if slot.ready_ref not in ready:
                continue
            try:
                slot.node = ray.get(slot.ready_ref)["node"]
            except RayError as exc:
                slot.ready_ref = None
                if slot.trial is not None:
                    self._lost_worker(slot, exc)
                else:
                    self.pool.discard(slot, kill=False)
                continue
            slot.ready_ref = None
            if slot.trial is not None:
                self.manifest.update(slot.trial.trial_id, node=slot.node)

    def _check_timeouts(self) -> None:
        if self.spec.timeout_s is None:
            return
        now = time.monotonic()
        for slot in self.pool.running():
            if slot.ref is not None and now - slot.started_clock > self.spec.timeout_s:
                if ray.wait([slot.ref], timeout=0)[0]:
                    continue  # its result came in just now: collected on the next round, not thrown away
                trial = slot.trial
                assert trial is not None
                self.pool.discard(slot)
                self._finish_without_result(trial, "timeout", f"exceeded timeout_s={self.spec.timeout_s:g}")

    # -- recording -----------------------------------------------------------------------------
    def _params_for(self, trial: Trial) -> list:
        return self.param_columns.columns(flatten(trial.params))

    def _record(self, trial: Trial, result: TrialResult) -> None:
        """Write a finished attempt: Parquet first, then the manifest, then MLflow (async)."""
        params = self._params_for(trial)
        if result.state == "done":
            # Only this attempt's tables stand for the trial (an earlier attempt's may be there:
            # its driver was killed before the manifest said so).
            self.store.remove_trial_tables(trial.trial_id)
            try:
                for name, table in result.tables.items():
                    schema = self.kind.tables.get(name)
                    self.store.write_table(name, trial.trial_id, table, schema, params if name.endswith("_summary") else None)
            except OSError:  # the disk, not the trial: ends the submission
                raise
            except Exception as exc:  # a table that does not fit its schema fails the trial, not the grid
                where = ""
                try:
                    where = f" (kept as they came in {self.store.keep_unstored(trial.trial_id, result.tables)})"
                except OSError:
                    raise
                except Exception:  # a table Parquet cannot hold at all: the error says what it was
                    pass
                result.state, result.error = "failed", f"could not store results{where}: {type(exc).__name__}: {exc}"[:1000]
        artifacts = self.store.artifacts_dir(trial.trial_id)
        for name, data in result.artifacts.items():
            try:
                atomic_write_bytes(artifacts / name, data)
            except OSError:
                raise
            except Exception as exc:  # a kind's artifact that is not bytes fails its trial, not the grid
                if result.state == "done":
                    result.state, result.error = "failed", f"could not store artifact {name!r}: {type(exc).__name__}: {exc}"
        if result.traceback:
            atomic_write_bytes(artifacts / "traceback.txt", result.traceback.encode())
        self._finish(trial, result.state, result.error, node=result.node, start=result.start_s, end=result.end_s,
                     environment=result.environment)

    def _finish_without_result(self, trial: Trial, state: str, error: str) -> None:
        entry = self.manifest.entry(trial.trial_id)
        now = time.time()
        if state in ("failed", "timeout"):
            atomic_write_bytes(self.store.artifacts_dir(trial.trial_id) / "error.txt", error.encode())
        self._finish(trial, state, error, node=entry.get("node"), start=entry.get("start_s") or now, end=now)

    def _finish(self, trial: Trial, state: str, error: str | None, node: str | None, start: float, end: float,
                environment: dict[str, Any] | None = None) -> None:
        # Without a result (timeout, cancelled) only the driver's side of the environment is known.
        environment = environment or dict.fromkeys(provenance.ENVIRONMENT_KEYS) | {
            "git_commit": self.submission.get("git"), "orch_version": self.submission.get("versions", {}).get("orch")}
        fields = {"state": state, "error": error, "node": node, "start_s": start, "end_s": end, "synced": False,
                  "environment": environment}
        record = dict(self.manifest.entry(trial.trial_id), **fields, **environment, duration_s=end - start)
        if state != "done":  # the tables hold done trials only; `trials` has a row for every ended one
            self.store.remove_trial_tables(trial.trial_id)
        # The trials row first: if it cannot be written, the manifest does not claim the trial ended.
        self.store.write_trial_row(trial.trial_id, record, self._params_for(trial))
        self.manifest.update(trial.trial_id, **fields)
        self.manifest.save()
        if state == "done":
            self._durations.append(end - start)
        self.progress.event(f"{state:<9} {trial.trial_id} {_axes_text(trial.axes)} ({end - start:.1f}s){': ' + error if error else ''}")
        self.telemetry.trial_finished(state, end - start)
        if self.logger is not None:
            self.logger.submit(trial.trial_id, record)

    # -- main loop ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Trials of this grid by state."""
        return self.manifest.counts(list(self.trials))

    def _eta(self, counts: dict[str, int]) -> float | None:
        if not self._durations:
            return None
        remaining = counts["queued"] + counts["running"]
        parallel = max(1, counts["running"])
        return sum(self._durations) / len(self._durations) * remaining / parallel

    def run(self, poll_s: float = 0.05) -> Outcome:
        """Run every pending trial; Ctrl-C cancels the running ones, an error outside a trial fails the submission.

        Raises PlacementError, before anything is recorded, when a trial fits no node.
        """
        self.admission.check_placeable(self.trials.values())
        self._open_manifest()
        self._start_tracking()
        self.live = LiveChannel(self.spec.experiment)
        status, error = "finished", None
        try:
            while self.pending or self.pool.running():
                if self.pending:
                    self._admit()
                self._wait(poll_s)
                self._start_reserved()
                self._check_timeouts()
                if self.logger is not None:
                    self.logger.submit_live(self.live.poll())
                    self._collect_tracking(self.logger.drain())
                if self.manifest.dirty:
                    self.manifest.save()
                counts = self.counts()
                self.telemetry.update(counts)
                self.progress.update(counts, time.time() - self._start, self._eta(counts))
        except KeyboardInterrupt:
            status = "interrupted"
            self._cancel_running("cancelled by the user")
        except Exception as exc:  # disk full, GCS lost, a bug: the submission failed, not its trials
            status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.progress.event(f"submission failed: {error}")
            self._cancel_running(f"cancelled: the submission failed ({error})")
        finally:
            # The manifest first: `ray job stop` sends SIGKILL 3 s after SIGTERM, and stopping the
            # actors may take longer; what is recorded must not wait for them.
            self.submission.update(status=status, ended_at=time.time(), error=error)
            try:
                self.manifest.save(force=True)
            except OSError as exc:
                error = error or f"could not save the manifest: {exc}"
            self._shutdown_actors()
            live = self.live.close()
            if self.logger is not None:
                self.logger.submit_live(live)
            tracking_error = self._close_tracking(status == "interrupted" or error is not None)
        counts = self.counts()
        self.progress.update(counts, time.time() - self._start, 0.0)
        return Outcome(counts=counts, interrupted=status == "interrupted", tracking_error=tracking_error, error=error)

    def _cancel_running(self, reason: str) -> None:
        """Record running trials cancelled (best effort: the store may be what failed) and requeue the rest."""
        for slot in self.pool.running():
            trial = slot.trial
            assert trial is not None
            self.pool.discard(slot)
            try:
                self._finish_without_result(trial, "cancelled", reason)
            except Exception:  # the trials row could not be written: the manifest still says cancelled
                now = time.time()
                entry = self.manifest.entry(trial.trial_id)
                self.manifest.update(trial.trial_id, state="cancelled", error=reason, end_s=now,
                                     start_s=entry.get("start_s") or now)
        for trial in list(self.pending):
            self.manifest.update(trial.trial_id, state="queued")
        self.pending.clear()
        for trial_id in self.trials:  # one whose result was being recorded when the error struck
            if self.manifest.entry(trial_id).get("state") == "running":
                self.manifest.update(trial_id, state="cancelled", error=reason, end_s=time.time())

    def _shutdown_actors(self, timeout_s: float = 10.0) -> None:
        """Ask every actor to close its session, all at once, waiting ``timeout_s`` in all; then kill them."""
        slots = list(self.pool.slots)
        refs = []
        for slot in slots:
            try:
                refs.append(slot.actor.shutdown.remote())
            except RayError:
                pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            except (GetTimeoutError, RayError):
                pass
        for slot in slots:
            self.pool.discard(slot)

    def _close_tracking(self, aborted: bool) -> str | None:
        if self.logger is None:
            return self.tracker.error if self.tracker else None
        self._collect_tracking(self.logger.close())
        try:
            self.manifest.flush()
        except OSError:
            pass
        try:
            self.tracker.end_parent(self.submission["parent_run_id"], "KILLED" if aborted else "FINISHED")
        except Exception as exc:  # the runs are logged; only the parent's status is missing
            return str(exc)
        return None


def _resources_text(resources: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted((resources or {}).items()) if v) or "none"


def _axes_text(axes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in axes.items())
