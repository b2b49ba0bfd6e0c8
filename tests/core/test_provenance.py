"""Provenance: the environment a trial ran in, and results from more than one code version."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.manifest import Manifest
from orchestrator.provenance import ENVIRONMENT_KEYS, trial_environment
from orchestrator.store import ExperimentStore


def test_trial_environment_names_code_versions_and_hardware() -> None:
    env = trial_environment("abc123")
    assert tuple(env) == ENVIRONMENT_KEYS
    assert env["git_commit"] == "abc123" and env["python_version"] == platform.python_version()
    assert env["hostname"] == socket.gethostname() and env["ray_version"] and env["cpu_model"]


def test_report_warns_when_an_experiment_holds_results_of_two_commits(tmp_path: Path) -> None:
    manifest = Manifest.load_or_new(ExperimentStore(tmp_path, "mixed"))
    manifest.data["kind"] = "toy"
    for trial_id, commit in (("a-0", "1111111111111111"), ("b-0", "2222222222222222"), ("c-0", "1111111111111111")):
        manifest.trials[trial_id] = {"state": "done", "environment": {"git_commit": commit}}
    manifest.save(force=True)
    result = CliRunner().invoke(main, ["report", "mixed", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ("warning: these results come from 2 different code versions (git 111111111111, 222222222222); "
            "compare with care") in result.output
    manifest.trials["b-0"]["environment"]["git_commit"] = "1111111111111111"
    manifest.save(force=True)
    assert "warning" not in CliRunner().invoke(main, ["report", "mixed", "--results", str(tmp_path)]).output
