"""`orch report --format html|md` where the page cannot go, or its MLflow run is not in the store."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main
from tests.report.synthetic import serving_experiment


def test_a_report_whose_run_is_not_in_the_tracking_store_is_written_and_says_so(tmp_path: Path) -> None:
    store = serving_experiment(tmp_path / "r")
    manifest = store.load_manifest()
    manifest["submissions"][-1]["parent_run_id"] = "0" * 32  # copied results: their run lives in another store
    store.save_manifest(manifest)
    out = tmp_path / "page"
    result = CliRunner().invoke(main, ["report", "serve", "--results", str(tmp_path / "r"), "--format", "md",
                                       "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}"])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and list((out / "figures").glob("*.svg"))
    assert f"MLflow: run {'0' * 32} is not in sqlite:///{tmp_path / 'other.db'}" in result.output
    assert "Traceback" not in result.output


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    serving_experiment(tmp_path / "r")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["report", "serve", "--results", str(tmp_path / "r"), "--format", "html",
                                       "--out", str(blocker / "page"), "--no-mlflow"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --out {blocker / 'page'}: cannot write the report there (Not a directory)"
