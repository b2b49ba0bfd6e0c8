"""Building grids and reading back results in core tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

TOY_KIND = "tests.support.kinds:ToyKind"
ORCH = [sys.executable, "-m", "orchestrator.cli"]


def write_grid(folder: Path, name: str = "grid.yaml", **fields: Any) -> Path:
    """Write a toy grid file; ``fields`` override the defaults."""
    grid = {"experiment": "toy", "kind": TOY_KIND, "grid": {"x": [1, 2]}, "resources": {"num_cpus": 1}} | fields
    path = folder / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def orch(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess (its own Ray), from the repo root."""
    env = dict(os.environ)
    return subprocess.run([*ORCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=check)


def mlflow_trial_runs(results: Path, experiment: str) -> list[Any]:
    """Active MLflow child runs (one per trial) of an experiment in the default SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{results.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=5000) if "orch.trial_id" in r.data.tags]


def parquet_trial_ids(results: Path, experiment: str, table: str) -> list[str]:
    """trial_id partitions present for a table."""
    folder = results / experiment / table
    return sorted(p.name.removeprefix("trial_id=") for p in folder.glob("trial_id=*") if (p / "part-0.parquet").exists())
