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
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    return bool(address) and address.startswith(("http://", "https://"))


def submission_id(experiment: str, grid_text: str) -> str:
    """Deterministic job id for a grid: 'orch-<experiment>-<hash of the grid file>'."""
    return f"orch-{experiment}-{hashlib.sha256(grid_text.encode()).hexdigest()[:10]}"


def _auth_headers() -> dict[str, str]:
    """Ray's access token as a bearer header, when one is configured on this machine."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=_auth_headers())


def submit_job(address: str, grid: Path, experiment: str, remote_results: str, extra_args: list[str]) -> tuple[str, bool]:
    """Submit (or find) the job for ``grid``; returns (submission id, whether it was newly submitted)."""
    with _jobs_api(address):
        return _submit_job(_client(address), grid, experiment, remote_results, extra_args)


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


def follow_logs(address: str, job_id: str) -> str:
    """Print the job's logs as they come; returns its final status."""

    async def tail() -> None:
        async for chunk in _client(address).tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    with _jobs_api(address):
        asyncio.run(tail())
    return job_status(address, job_id)


def job_status(address: str, job_id: str) -> str:
    """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
    with _jobs_api(address):
        return str(_client(address).get_job_status(job_id).value)


def list_jobs(address: str) -> list[dict[str, Any]]:
    """orch jobs on the cluster: id, experiment, status."""
    out = []
    with _jobs_api(address):
        jobs = _client(address).list_jobs()
    for job in jobs:
        if job.submission_id and job.submission_id.startswith("orch-"):
            out.append({"id": job.submission_id, "experiment": (job.metadata or {}).get("orch.experiment"),
                        "status": str(job.status.value)})
    return out


def stop_job(address: str, job_id: str) -> bool:
    """Ask Ray to stop a job (its driver gets SIGTERM first, so running trials are recorded cancelled)."""
    with _jobs_api(address):
        return bool(_client(address).stop_job(job_id))
