"""The trial-kind contract: what the orchestrator needs from a workload family.

A kind (``serving``, ``training``, or one a test defines) is one class registered by name
(see ``workloads/registry.py``). The orchestrator never imports a kind's module directly: it
resolves the name, validates parameters with ``params_model``, and runs trials in Ray actors
through ``open`` / ``run`` / ``close``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict


class KindParams(BaseModel):
    """Base for a kind's typed parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TrialContext:
    """What a running trial knows about itself."""

    experiment: str
    trial_id: str
    repeat: int
    attempt: int
    # Per-trial folder that survives retries (checkpoints live here) while the code stays the same:
    # the orchestrator empties it when the trial runs under another code version.
    workdir: Path
    # Per-trial resources from the grid (num_cpus, num_gpus, custom resources).
    resources: dict[str, float]
    # Live metrics while the trial runs (best effort; may be a no-op): report(record, step=None).
    # Known keys feed Ray metrics (orchestrator/telemetry.py); records with a step also become
    # MLflow step metrics during the trial. Picklable, so it can be handed to worker processes.
    report: Callable[..., None] = field(default=lambda _record, step=None: None)
    # The code the trial runs (git revision, '-dirty' when modified); a kind that keeps state
    # outside ``workdir`` (a shared checkpoint storage) keys it by this, so that a rerun after a
    # code change does not resume what older code computed.
    code_version: str | None = None


@dataclass
class TrialOutput:
    """What a trial returns: typed tables plus optional artifacts (name -> bytes)."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)


class TrialKind(ABC):
    """A family of trials. Subclasses set ``name``, ``params_model`` and ``tables``."""

    name: ClassVar[str]
    params_model: ClassVar[type[KindParams]]
    # Arrow schema of each table the kind writes; the store conforms outputs to these.
    tables: ClassVar[dict[str, pa.Schema]] = {}
    # Parameters that do not change the loaded engine/model: trials that differ only in
    # these share one ``open`` session (engine groups).
    load_keys: ClassVar[frozenset[str]] = frozenset()
    # Dotted parameters holding file paths: relative ones are resolved against the directory
    # `orch submit` ran in, since trial actors run in other directories (or on other nodes).
    path_keys: ClassVar[frozenset[str]] = frozenset()
    # Columns `orch report` shows per summary table (table -> columns); empty = all numeric columns.
    report_columns: ClassVar[dict[str, list[str]]] = {}

    def actor_resources(self, params: KindParams, resources: dict[str, float]) -> dict[str, float]:
        """Resources the trial's own actor holds (default: the grid's per-trial resources)."""
        return dict(resources)

    def worker_bundles(self, params: KindParams, resources: dict[str, float]) -> list[dict[str, float]]:
        """Resources of each worker the trial starts itself (e.g. Ray Train's), one bundle each; default none.

        The orchestrator reserves them together, atomically, before the trial starts.
        """
        return []

    def footprint(self, params: KindParams, resources: dict[str, float]) -> dict[str, float]:
        """Total cluster resources a running trial occupies: its actor plus its workers."""
        total = dict(self.actor_resources(params, resources))
        for bundle in self.worker_bundles(params, resources):
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def check_cluster(self, params: KindParams, nodes: list[dict[str, float]]) -> None:
        """Refuse, at submit time, a trial this cluster cannot run: raise ValueError with one line
        saying what is missing. ``nodes``: each alive node's resources. Default: accept.

        It may run away from the cluster (``orch submit --address http://HEAD:8265`` checks
        before submitting the job): what the machine itself must offer goes in ``check_host``."""
        del params, nodes

    def check_host(self, params: KindParams) -> None:
        """Refuse, where the driver runs, a trial this machine cannot set up (ValueError, one line).
        Default: accept."""
        del params

    def open(self, params: KindParams) -> Any:
        """Build what trials of one engine group share (e.g. a loaded model). Default: nothing."""
        return None

    @abstractmethod
    def run(self, session: Any, params: KindParams, ctx: TrialContext) -> TrialOutput:
        """Run one trial and return its tables."""

    def close(self, session: Any) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release what ``open`` built."""

    def run_alone(self, params: KindParams, ctx: TrialContext) -> TrialOutput:
        """One trial in a session of its own: open, run, close (benchmarks and tests)."""
        session = self.open(params)
        try:
            return self.run(session, params, ctx)
        finally:
            self.close(session)

    def serve(self, params: KindParams, host: str, port: int) -> str:
        """Put this configuration into service (``orch serve``); returns its base URL."""
        raise NotImplementedError(f"kind {self.name!r} has nothing to serve")
