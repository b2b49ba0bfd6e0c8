"""Connect to a Ray cluster, or start an embedded one bound to loopback."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from backends.network.ports import free_port
from orchestrator import access
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
    token_file: str | None = None  # the cluster's token; default: access.token_for's rules
    allow_insecure: bool = False  # plain gRPC to an address that is not private


LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def set_ray_env(address: str | None = None) -> None:
    """Default Ray's environment (user settings win), before Ray is imported.

    A driver joining a cluster at a non-loopback ``address`` must use its interface address
    (at ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray pins it to 127.0.0.1 and it cannot attach to
    its node's raylet), so there the loopback rule is lifted.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("local", "auto"):
        try:
            remote = not access.is_loopback(access.parse_address(address).host)
        except access.AccessError:
            return  # connect() reports the bad address
        if remote:
            os.environ[LOOPBACK_ONLY_ENV] = "1"


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
        _join(address, options)
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


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (Ray's C++ client logs its retries there) for a probe."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _probe_gcs(endpoint: access.Endpoint, token: tuple[str, str] | None) -> None:
    """Ask the GCS for one key with our token: a refused token fails here in about a second."""
    from ray._raylet import GcsClient

    try:
        with _quiet_stderr():
            GcsClient(address=f"{endpoint.host}:{endpoint.port}").internal_kv_get(b"session_name", b"session",
                                                                                timeout=access.PROBE_TIMEOUT_S)
    except Exception as exc:  # auth, timeout and RPC errors all become one line
        raise access.AccessError(access.describe_ray_error(endpoint, token, exc)) from None


def use_token(token: tuple[str, str] | None) -> None:
    """Make this process's Ray use ``token`` (token auth with it), or no token (auth off) when None."""
    os.environ.update(access.ray_auth_env(token))
    from ray._raylet import AuthenticationTokenLoader, Config

    # Ray caches its config and token at first use (an earlier `import ray` may have read them).
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _join(address: str, options: ClusterOptions) -> None:
    """Connect to an existing cluster: check the transport, reachability and token first, then ray.init."""
    endpoint = access.parse_address(address)
    if endpoint.scheme == "ray":
        # A Ray Client driver stays here: its trials' folders (under --results) would be this
        # machine's paths, which the cluster's nodes do not have.
        raise access.AccessError(
            f"orch does not drive a cluster through Ray Client ({address}): trial folders would be paths of this "
            f"machine; submit through the head's Jobs API (--address http://{endpoint.host}:8265), or run orch on a "
            f"cluster node with --address {endpoint.host}:6379"
        )
    access.check_transport(endpoint, options.allow_insecure)
    access.check_reachable(endpoint)
    token = access.token_for(endpoint, options.token_file)
    use_token(token)
    if endpoint.scheme == "gcs":
        _probe_gcs(endpoint, token)
    import ray

    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except Exception as exc:
        raise access.AccessError(access.describe_ray_error(endpoint, token, exc)) from None


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's resources in the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_cluster(kind: TrialKind, trials: list[Trial], nodes: list[dict[str, float]], host: bool) -> None:
    """Ask the kind whether a cluster of these nodes (each one's resources) can run each trial and,
    with ``host`` (the driver runs here), whether this machine can set it up; SpecError (one line) if not."""
    for trial in trials:
        params = kind.params_model.model_validate(trial.params)
        try:
            kind.check_cluster(params, nodes)
            if host:
                kind.check_host(params)
        except ValueError as exc:
            raise SpecError(f"trial {trial.trial_id}: {exc}") from None


def _multiprocessing_folders() -> set[Path]:
    """The folders multiprocessing made in the temp dir (``pymp-*``) that hold a socket of one of
    this process's descendants (an embedded cluster's processes: orch's driver starts no others).

    Ray's dashboard starts its modules through a multiprocessing forkserver, whose socket lives in
    such a folder; shutdown orphans the forkserver, which exits without removing it.
    """
    import psutil

    temp = Path(tempfile.gettempdir()).resolve()
    folders: set[Path] = set()
    for process in psutil.Process().children(recursive=True):
        try:
            sockets = process.net_connections(kind="unix")
        except psutil.Error:
            continue  # gone, or not ours to read
        for sock in sockets:
            path = Path(sock.laddr) if isinstance(sock.laddr, str) and sock.laddr.startswith("/") else None
            if path is not None and path.parent.parent == temp and path.parent.name.startswith("pymp-"):
                folders.add(path.parent)
    return folders


def disconnect() -> None:
    """Detach from Ray; an embedded cluster this process started stops with it, leaving nothing in /tmp."""
    import ray

    if ray.is_initialized():
        # Only an embedded cluster's processes are this process's descendants; once it is shut
        # down, nothing connects to their sockets again (a forkserver may take seconds to exit).
        leftovers = _multiprocessing_folders()
        ray.shutdown()
        for folder in leftovers:
            shutil.rmtree(folder, ignore_errors=True)
