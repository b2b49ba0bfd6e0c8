"""The report's files as artifacts of the MLflow parent run of the experiment's last submission."""

from __future__ import annotations

from pathlib import Path

from orchestrator.store import ExperimentStore

ARTIFACT_PATH = "report"


def log_report(store: ExperimentStore, files: list[Path], out: Path, tracking_uri: str | None = None) -> str:
    """Log ``files`` (paths under ``out``) to the last submission's parent run; returns a one-line outcome."""
    from orchestrator.tracking import Tracker

    manifest = store.load_manifest() or {}
    runs = [s["parent_run_id"] for s in manifest.get("submissions", []) if s.get("parent_run_id")]
    if not runs:
        return "MLflow: no parent run recorded for this experiment (run `orch sync` first); report not logged"
    tracker = Tracker(store, tracking_uri)
    if not tracker.available:
        return f"MLflow at {tracker.uri} is unreachable ({tracker.error}); report not logged"
    if not tracker.has_run(runs[-1]):  # results moved or copied, or another store: the page stands on its own
        return (f"MLflow: run {runs[-1]} is not in {tracker.uri} (results moved, or another tracking store); "
                "report not logged (--no-mlflow skips this)")
    for path in files:
        folder = path.parent.relative_to(out).as_posix()
        tracker.client.log_artifact(runs[-1], str(path), artifact_path=ARTIFACT_PATH if folder == "." else f"{ARTIFACT_PATH}/{folder}")
    return f"MLflow: logged {len(files)} file(s) to run {runs[-1]} under {ARTIFACT_PATH}/"
