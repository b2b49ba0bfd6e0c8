"""The trial actor: builds the kind's session, runs trials in order, returns Arrow tables.

One actor runs many trials (one at a time), so process start-up is paid once per actor, and
trials of one engine group reuse the session ``open`` built (a loaded model). A trial that
raises comes back as a ``failed`` result; the actor itself only dies when its process does.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from orchestrator.provenance import trial_environment
from workloads.kind import TrialContext, TrialKind
from workloads.registry import resolve_kind

CODE_VERSION_FILE = ".code_version"


def fresh_workdir(workdir: Path, code_version: str | None) -> None:
    """Make the trial's folder, emptied first when it was last used by another code version.

    It keeps checkpoints across retries and resubmissions, so that a trial resumes; but a trial
    rerun after a fix must not resume from steps the old code computed.
    """
    marker = workdir / CODE_VERSION_FILE
    version = code_version or "unknown"
    if workdir.is_dir() and marker.is_file() and marker.read_text().strip() != version:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(version)


@dataclass(frozen=True)
class TrialJob:
    """What the driver hands an actor for one attempt of one trial."""

    experiment: str
    kind: str
    trial_id: str
    repeat: int
    attempt: int
    params: dict[str, Any]
    resources: dict[str, float]
    group_key: str
    workdir: str
    git_commit: str | None = None  # the driver's code revision, recorded with the trial's environment
    # Live metrics callback (orchestrator.live.LiveReporter); None: no live metrics.
    report: Callable[..., None] | None = None


@dataclass
class TrialResult:
    """What an attempt produced."""

    trial_id: str
    state: str  # done | failed
    node: str
    pid: int
    start_s: float
    end_s: float
    tables: dict[str, pa.Table] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)  # provenance.ENVIRONMENT_KEYS


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


class TrialRunner:
    """Ray actor body (wrapped with ``ray.remote`` by the scheduler with each trial's resources)."""

    def __init__(self, kind: str | None = None) -> None:
        self._kinds: dict[str, TrialKind] = {}
        if kind is not None:  # import it now, before the actor reports ready and a trial's timeout starts
            try:
                self._kind(kind)
            except Exception:  # run() reports it as the trial's error
                pass
        self._session: Any = None
        self._session_key: tuple[str, str] | None = None
        self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
        self._environment = trial_environment()

    def where(self) -> dict[str, Any]:
        """Node id, host and pid of this actor."""
        return {"node": self._node, "host": socket.gethostname(), "pid": os.getpid()}

    def _kind(self, name: str) -> TrialKind:
        if name not in self._kinds:
            self._kinds[name] = resolve_kind(name)
        return self._kinds[name]

    def _close_session(self) -> None:
        if self._session_key is not None:
            kind = self._kind(self._session_key[0])
            session, self._session, self._session_key = self._session, None, None
            kind.close(session)

    def run(self, job: TrialJob) -> TrialResult:
        """Run one attempt of one trial; exceptions become a failed result."""
        start = time.time()
        environment = dict(self._environment, git_commit=job.git_commit)
        try:
            kind = self._kind(job.kind)
            params = kind.params_model.model_validate(job.params)
            key = (job.kind, job.group_key)
            if self._session_key != key:
                self._close_session()
                self._session = kind.open(params)
                self._session_key = key
            workdir = Path(job.workdir)
            fresh_workdir(workdir, job.git_commit)
            ctx = TrialContext(
                experiment=job.experiment,
                trial_id=job.trial_id,
                repeat=job.repeat,
                attempt=job.attempt,
                workdir=workdir,
                resources=job.resources,
                **({"report": job.report} if job.report is not None else {}),
                code_version=job.git_commit,
            )
            output = kind.run(self._session, params, ctx)
            getattr(job.report, "flush", lambda: None)()
            return TrialResult(
                trial_id=job.trial_id,
                state="done",
                node=self._node,
                pid=os.getpid(),
                start_s=start,
                end_s=time.time(),
                tables=dict(output.tables),
                artifacts=dict(output.artifacts),
                environment=environment,
            )
        except Exception as exc:  # the trial's failure is data, not the actor's
            try:
                self._close_session()
            except Exception:  # a broken session must not hide the trial's own error
                self._session, self._session_key = None, None
            return TrialResult(
                trial_id=job.trial_id,
                state="failed",
                node=self._node,
                pid=os.getpid(),
                start_s=start,
                end_s=time.time(),
                error=_one_line(exc),
                traceback=traceback.format_exc(),
                environment=environment,
            )

    def shutdown(self) -> None:
        """Close the open session before the actor is released."""
        self._close_session()
