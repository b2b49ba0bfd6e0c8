"""A trial's folder keeps its checkpoints across attempts of the same code, not across a code change."""

from __future__ import annotations

from pathlib import Path

from orchestrator.runner import fresh_workdir
from workloads.kind import TrialContext
from workloads.training.kind import run_name


def test_checkpoints_survive_a_retry_but_not_a_code_change(tmp_path: Path) -> None:
    workdir = tmp_path / "work" / "t-0"
    fresh_workdir(workdir, "abc")
    (workdir / "step_10").mkdir()
    fresh_workdir(workdir, "abc")  # a retry, or a resubmission of the same code: resume
    assert (workdir / "step_10").is_dir()
    fresh_workdir(workdir, "def")  # the code changed: start afresh
    assert workdir.is_dir() and not (workdir / "step_10").exists()
    assert (workdir / ".code_version").read_text() == "def"


def test_a_folder_from_before_the_marker_is_kept_and_marked(tmp_path: Path) -> None:
    workdir = tmp_path / "t-0"
    (workdir / "step_10").mkdir(parents=True)
    fresh_workdir(workdir, None)
    assert (workdir / "step_10").is_dir() and (workdir / ".code_version").read_text() == "unknown"


def test_a_shared_storage_run_is_named_by_the_code_it_ran() -> None:
    def ctx(code: str | None) -> TrialContext:
        return TrialContext(experiment="e", trial_id="t-0", repeat=0, attempt=1, workdir=Path("/w"), resources={},
                            code_version=code)

    assert run_name(ctx("0123456789abcdef")) == "e.t-0.0123456789ab"
    assert run_name(ctx("0123456789abcdef-dirty")) == "e.t-0.0123456789ab-dirty"
    assert run_name(ctx(None)) == "e.t-0.unknown"
