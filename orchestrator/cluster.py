"""Connect to a Ray cluster, or start an embedded one bound to loopback."""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.expand import Trial
from orchestrator.spec import SpecError
from workloads.kind import TrialKind

# Ray reads these at import/start: keep usage stats off and Ray's own traffic on 127.0.0.1.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DASHBOARD_PORT = 8265


@dataclass(frozen=True)
class ClusterOptions:
    """How to reach Ray: ``address`` None starts an embedded local cluster."""

    address: str | None = None
    dashboard: bool = True
    dashboard_port: int = DASHBOARD_PORT
    num_cpus: float | None = None
    num_gpus: float | None = None


def set_ray_env() -> None:
    """Default Ray's environment (user settings win)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def connect(options: ClusterOptions) -> str | None:
    """Initialise Ray; for an embedded cluster with a dashboard, returns the dashboard's URL."""
    set_ray_env()
    import ray

    if ray.is_initialized():
        return None
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return None
    context = ray.init(
        # "local" always starts a new cluster; a bare init() would join whatever cluster
        # another process on this machine last started.
        address="local",
        include_dashboard=options.dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=options.dashboard_port,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        logging_level="WARNING",
        log_to_driver=False,
    )
    # Ray takes another port when DASHBOARD_PORT is busy: report the one it took.
    url = getattr(context, "dashboard_url", None) if options.dashboard else None
    return f"http://{url}" if url and not url.startswith("http") else url


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's resources in the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_cluster(kind: TrialKind, trials: list[Trial]) -> None:
    """Ask the kind whether this cluster can run each trial; SpecError (one line) if not."""
    nodes = alive_nodes()
    for trial in trials:
        try:
            kind.check_cluster(kind.params_model.model_validate(trial.params), nodes)
        except ValueError as exc:
            raise SpecError(f"trial {trial.trial_id}: {exc}") from None


def disconnect() -> None:
    """Detach from Ray; an embedded cluster this process started stops with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
