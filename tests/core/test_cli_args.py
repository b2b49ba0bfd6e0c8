"""Experiment names and folders given on the command line: one line, and never a path out of --results."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from tests.report.synthetic import serving_experiment

NAME_RULE = "must match [A-Za-z0-9._-]+, at most 100 characters, and not be '.' or '..'"


@pytest.mark.parametrize("command", ["status", "report", "sync", "cancel"])
@pytest.mark.parametrize("name", ["", "../outside/serve", "/abs/serve", "a" * 101])
def test_an_experiment_argument_follows_the_grid_naming_rule(tmp_path: Path, command: str, name: str) -> None:
    outside = tmp_path / "outside"
    serving_experiment(outside)  # a real experiment the relative and absolute names would reach
    results = tmp_path / "results"
    results.mkdir()
    result = CliRunner().invoke(main, [command, name, "--results", str(results)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: experiment {name!r}: {NAME_RULE}"
    assert not (outside / "serve" / "report").exists()


def test_compare_refuses_one_experiment_against_itself(tmp_path: Path) -> None:
    serving_experiment(tmp_path)
    result = CliRunner().invoke(main, ["compare", "serve", "serve", "--results", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip() == "error: compare needs two experiments; got 'serve' twice"


def test_ls_says_when_the_results_folder_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ls", "--results", str(tmp_path / "none")])
    assert result.exit_code == 0
    assert result.output.strip() == (f"no experiments: there is no results folder at {tmp_path / 'none'} "
                                     "(--results or $ORCH_RESULTS names another)")
