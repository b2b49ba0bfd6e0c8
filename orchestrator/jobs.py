"""Submitting the driver to a remote cluster as a Ray Job (``--address http://HEAD:8265``).

The grid's folder is uploaded as the job's working directory and ``orch submit`` runs on the
head node against the cluster (so ``orch`` must be on the PATH Ray was started with there, as
``cluster.yaml`` arranges); results land in ``remote_results`` on the head. The submission
id is derived from the experiment and the grid's content, so submitting the same grid again
attaches to the job already running instead of starting a second driver.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.access import (
    AccessError,
    Endpoint,
    auth_headers,
    check_jobs_api,
    check_reachable,
    check_transport,
    parse_address,
    token_for,
)
from orchestrator.cluster import use_token

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 180


class JobsError(RuntimeError):
    """The cluster's jobs API refused or could not be reached; the message is one line."""


@contextmanager
def _jobs_api(address: str) -> Iterator[None]:
    try:
        yield
    except JobsError:
        raise
    except Exception as exc:  # connection, auth and API errors all become one line for the user
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise JobsError(f"Ray jobs API at {address}: {first.strip()[:300]}") from None
UPLOAD_EXCLUDES = [".venv", ".venv-vllm", "results", ".git", "**/__pycache__", "*.parquet", "mlflow.db"]


def is_job_address(address: str | None) -> bool:
    """Whether an address names a Ray dashboard (jobs API) rather than a GCS or Ray Client endpoint."""
    return bool(address) and address.strip().lower().startswith(("http://", "https://"))


def submission_id(experiment: str, grid_text: str) -> str:
    """Deterministic job id for a grid: 'orch-<experiment>-<hash of the grid file>'."""
    return f"orch-{experiment}-{hashlib.sha256(grid_text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class JobsTarget:
    """A Jobs API that passed the access checks, with the headers (its own token) to send it."""

    endpoint: Endpoint
    headers: dict[str, str]

    @property
    def address(self) -> str:
        """The address as the user gave it."""
        return self.endpoint.address


def target(address: str, token_file: str | None = None, allow_insecure: bool = False) -> JobsTarget:
    """Check the address (transport, reachability, token) and return the target; JobsError (one line) if refused."""
    try:
        endpoint = parse_address(address)
        check_transport(endpoint, allow_insecure)
        check_reachable(endpoint)
        token = token_for(endpoint, token_file)
        check_jobs_api(endpoint, token)
    except AccessError as exc:
        raise JobsError(str(exc)) from None
    # Ray's client adds this machine's token by itself when RAY_AUTH_MODE=token: only ours may go.
    use_token(token)
    return JobsTarget(endpoint, auth_headers(token))


def _client(target: JobsTarget) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(target.address, headers=target.headers)


def submit_job(target: JobsTarget, grid: Path, experiment: str, remote_results: str, extra_args: list[str]) -> tuple[str, bool]:
    """Submit (or find) the job for ``grid``; returns (submission id, whether it was newly submitted)."""
    with _jobs_api(target.address):
        return _submit_job(_client(target), grid, experiment, remote_results, extra_args)


def _submit_job(client: Any, grid: Path, experiment: str, remote_results: str, extra_args: list[str]) -> tuple[str, bool]:
    job_id = submission_id(experiment, grid.read_text())
    try:
        status = str(client.get_job_status(job_id).value)
    except RuntimeError:  # no such job
        status = None
    if status is not None and status not in TERMINAL:
        return job_id, False
    if status is not None:
        client.delete_job(job_id)
    entrypoint = " ".join(
        ["orch", "submit", shlex.quote(grid.name), "--results", remote_results, *map(shlex.quote, extra_args)]
    )
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env={"working_dir": str(grid.resolve().parent), "excludes": UPLOAD_EXCLUDES},
                metadata={"orch.experiment": experiment},
            )
            return job_id, True
        except RuntimeError as exc:
            # A freshly started head answers before its job agent is up ("try again later").
            if "try again later" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def follow_logs(target: JobsTarget, job_id: str) -> str:
    """Print the job's logs as they come; returns its final status."""

    async def tail() -> None:
        async for chunk in _client(target).tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    with _jobs_api(target.address):
        asyncio.run(tail())
    return job_status(target, job_id)


def job_status(target: JobsTarget, job_id: str) -> str:
    """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
    with _jobs_api(target.address):
        return str(_client(target).get_job_status(job_id).value)


def list_jobs(target: JobsTarget) -> list[dict[str, Any]]:
    """orch jobs on the cluster: id, experiment, status."""
    out = []
    with _jobs_api(target.address):
        jobs = _client(target).list_jobs()
    for job in jobs:
        if job.submission_id and job.submission_id.startswith("orch-"):
            out.append({"id": job.submission_id, "experiment": (job.metadata or {}).get("orch.experiment"),
                        "status": str(job.status.value)})
    return out


def stop_job(target: JobsTarget, job_id: str) -> bool:
    """Ask Ray to stop a job (its driver gets SIGTERM first, so running trials are recorded cancelled)."""
    with _jobs_api(target.address):
        return bool(_client(target).stop_job(job_id))


def cluster_nodes(target: JobsTarget, settle_s: float = 20.0) -> list[tuple[str, dict[str, float]]]:
    """(node address, total resources) of the cluster's alive nodes, from the dashboard's state API.

    The head is itself a node, so an empty answer means the dashboard answers before the head's
    raylet has registered (just after `ray start` / `ray up`): ask again for up to ``settle_s``."""
    import httpx

    deadline = time.monotonic() + settle_s
    while True:
        with _jobs_api(target.address):
            response = httpx.get(f"{target.address.rstrip('/')}/api/v0/nodes",
                                 params={"detail": "1", "limit": "1000"}, headers=target.headers, timeout=30)
            response.raise_for_status()
            rows = response.json()["data"]["result"]["result"]
        nodes = [(row.get("node_ip", "?"), {k: float(v) for k, v in (row.get("resources_total") or {}).items()
                                            if not k.startswith("node:")})
                 for row in rows if row.get("state") == "ALIVE"]
        if nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def check_placeable(target: JobsTarget, kind: Any, trials: list[Any]) -> None:
    """Refuse, before submitting, a grid with a trial that no node of the cluster can hold (PlacementError)
    or that the kind says this cluster cannot run (SpecError); what the head's own machine must offer
    (``check_host``) its driver checks there."""
    from orchestrator.cluster import check_cluster
    from orchestrator.placement import check_placeable as check
    from orchestrator.placement import trial_needs

    nodes = cluster_nodes(target)
    check({trial.trial_id: trial_needs(kind, trial) for trial in trials}, nodes)
    check_cluster(kind, trials, [resources for _address, resources in nodes], host=False)
