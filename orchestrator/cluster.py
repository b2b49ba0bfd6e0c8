"""Connect to a Ray cluster, or start an embedded one bound to loopback."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from backends.network.ports import free_port
from orchestrator.expand import Trial
from orchestrator.spec import SpecError
from workloads.kind import TrialKind

# Ray reads these at import/start: keep usage stats off and Ray's own traffic on 127.0.0.1.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DASHBOARD_PORT = 8265
LOOPBACK = "127.0.0.1"


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


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP port can be bound on ``host`` right now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def connect(options: ClusterOptions) -> str:
    """Initialise Ray; returns one line saying which Ray this process uses.

    An embedded cluster is always this process's own (its lifetime is this submission's), so
    two submissions on one machine run side by side: when the dashboard port is taken (by
    another embedded Ray), the new one takes a free port and says so.
    """
    set_ray_env()
    import ray

    if ray.is_initialized():
        return "using the Ray this process is already connected to"
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return f"joined the Ray cluster at {address}"
    port = options.dashboard_port
    moved = options.dashboard and not port_is_free(port)
    if moved:
        port = free_port()
    context = ray.init(
        # "local" always starts a new cluster; a bare init() would join whatever cluster
        # another process on this machine last started.
        address="local",
        include_dashboard=options.dashboard,
        dashboard_host=LOOPBACK,
        dashboard_port=port,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        logging_level="WARNING",
        log_to_driver=False,
    )
    if not options.dashboard:
        return "embedded Ray started (no dashboard)"
    url = getattr(context, "dashboard_url", None) or f"{LOOPBACK}:{port}"
    url = url if url.startswith("http") else f"http://{url}"
    where = f"dashboard at {url} (token: ~/.ray/auth_token)"
    if moved:
        return (f"embedded Ray started beside another Ray on this machine (port {options.dashboard_port} is taken); "
                f"{where}")
    return f"embedded Ray started; {where}"


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
