"""A corrupt ``manifest.json``: one clear line naming the file, the other experiments still listed, the file kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ExperimentStore, ManifestError
from tests.core.helpers import orch, write_grid
from tests.report.synthetic import serving_experiment

NOT_JSON = "{not json"
NOT_JSON_REASON = "Expecting property name enclosed in double quotes (line 1 col 2)"


def _results(tmp_path: Path) -> Path:
    """A readable experiment `serve` (12 done trials) beside `bad` (not JSON) and `list` (a JSON array)."""
    results = tmp_path / "results"
    serving_experiment(results)
    for name, text in (("bad", NOT_JSON), ("list", "[]")):
        (results / name).mkdir()
        (results / name / "manifest.json").write_text(text)
    return results


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(("text", "reason"), [(NOT_JSON, NOT_JSON_REASON), ("[]", "a JSON array, not an object"),
                                              ('{"trials": []}', "'trials' is not an object of trial objects")])
def test_loading_names_the_file_and_what_is_wrong(tmp_path: Path, text: str, reason: str) -> None:
    store = ExperimentStore(tmp_path, "bad")
    store.path.mkdir()
    store.manifest_path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        store.load_manifest()
    assert str(caught.value) == f"{store.manifest_path} is unreadable: {reason}"


def test_listing_commands_show_it_unreadable_and_carry_on(tmp_path: Path) -> None:
    results = _results(tmp_path)
    listed = _cli("ls", "--results", str(results))
    assert listed.exit_code == 0, listed.output
    assert "Traceback" not in listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 3}
    assert set(rows) == {"bad", "list", "serve"}
    assert "unreadable" in rows["bad"] and "unreadable" in rows["list"] and "serving" in rows["serve"]
    assert f"{results / 'bad' / 'manifest.json'} is unreadable: {NOT_JSON_REASON}" in listed.stdout
    assert f"{results / 'list' / 'manifest.json'} is unreadable: a JSON array, not an object" in listed.stdout

    status = _cli("status", "--results", str(results))
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    assert f"bad: {results / 'bad' / 'manifest.json'} is unreadable: {NOT_JSON_REASON}" in lines
    assert any(line.startswith("list: ") and "a JSON array" in line for line in lines)
    assert any(line.startswith("serve (serving)") and "done 12" in line for line in lines)


@pytest.mark.parametrize("command", [["status", "bad"], ["report", "bad"], ["report", "bad", "--format", "html"],
                                     ["compare", "serve", "bad"], ["sync", "bad"]])
def test_a_command_on_it_exits_2_with_one_line(tmp_path: Path, command: list[str]) -> None:
    results = _results(tmp_path)
    result = _cli(*command, "--results", str(results))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == f"error: {results / 'bad' / 'manifest.json'} is unreadable: {NOT_JSON_REASON}\n"
    assert (results / "bad" / "manifest.json").read_text() == NOT_JSON
    assert not (results / "bad" / "report").exists()


def test_submit_refuses_and_keeps_the_file(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "bad").mkdir(parents=True)
    (results / "bad" / "manifest.json").write_text(NOT_JSON)
    grid = write_grid(tmp_path, experiment="bad")
    result = orch("submit", str(grid), "--results", str(results), "--no-dashboard", "--num-cpus", "1", timeout=240)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {results / 'bad' / 'manifest.json'} is unreadable: {NOT_JSON_REASON}" in result.stderr.splitlines()
    assert (results / "bad" / "manifest.json").read_text() == NOT_JSON
    assert sorted(p.name for p in (results / "bad").iterdir()) == ["manifest.json"]  # no table, no lock left
    # refused before anything started: no Ray, no MLflow store
    assert "embedded Ray" not in result.stdout + result.stderr and not (results / "mlflow.db").exists()
