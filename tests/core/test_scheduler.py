"""The scheduler on a real local Ray: results, failures, worker kills, timeouts, resume, MLflow."""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.expand import expand
from orchestrator.scheduler import Submission
from orchestrator.spec import load_spec
from orchestrator.store import ExperimentStore
from orchestrator.tracking import Tracker
from tests.core.helpers import mlflow_trial_runs, parquet_trial_ids, write_grid
from tests.support.kinds import TOY_SUMMARY, ToyKind


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


class RecordedProgress:
    """The events a submission reports, kept for assertions."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None:
        pass

    def event(self, message: str) -> None:
        self.events.append(message)


def submit(grid: Path, results: Path, tracking_uri: str | None = None, progress: RecordedProgress | None = None):
    spec = load_spec(grid)
    kind = ToyKind()
    store = ExperimentStore(results, spec.experiment)
    tracker = Tracker(store, tracking_uri)
    outcome = Submission(spec, kind, expand(spec, kind), store, tracker, progress=progress, refresh_s=0.2).run()
    return outcome, store, store.load_manifest()


def test_grid_completes_with_results_in_parquet_manifest_and_mlflow(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, experiment="ok", grid={"x": [1, 2], "y": [0, 1, 2]}, base={"steps": 5})
    outcome, store, manifest = submit(grid, tmp_path / "r")
    assert outcome.counts["done"] == 6 and not outcome.interrupted
    ids = sorted(manifest["trials"])
    assert parquet_trial_ids(tmp_path / "r", "ok", "toy_summary") == ids
    assert parquet_trial_ids(tmp_path / "r", "ok", "trials") == ids
    summary = store.read_table("toy_summary").to_pandas()
    assert sorted(zip(summary["x"], summary["y"], summary["score"], strict=True)) == [
        (x, y, x * 10 + y) for x in (1.0, 2.0) for y in (0, 1, 2)
    ]
    # trials of one engine group (same x; y is a load key) reuse an actor's open session, and with
    # two actors the two groups start on different actors: each group's session is opened once
    assert sorted(summary["opened"]) == [1, 1, 2, 2, 3, 3]
    assert summary.groupby("x")["pid"].nunique().tolist() == [1, 1]
    submission = manifest["submissions"][-1]
    assert submission["status"] == "finished" and submission["versions"]["ray"] == ray.__version__
    assert submission["hardware"]["cluster_resources"]["CPU"] == 2.0
    runs = mlflow_trial_runs(tmp_path / "r", "ok")
    assert sorted(r.data.tags["orch.trial_id"] for r in runs) == ids
    assert all(r.data.tags["mlflow.parentRunId"] == submission["parent_run_id"] for r in runs)
    by_trial = {r.data.tags["orch.trial_id"]: r for r in runs}
    for trial_id, entry in manifest["trials"].items():
        run = by_trial[trial_id]
        assert entry["synced"] and entry["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["score"] == entry["params"]["x"] * 10 + entry["params"]["y"]
        assert run.data.params["x"] == str(entry["params"]["x"])
        assert "x" not in run.data.metrics  # parameters are params, not metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'r' / 'mlflow.db').resolve()}")
    history = client.get_metric_history(runs[0].info.run_id, "toy_steps/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1 / (s + 1)) for s in range(5)]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"note.txt", "tables"} <= artifacts
    # each trial's environment beside its parameters: trials table, manifest, MLflow tags
    trials = store.read_table("trials").to_pandas()
    assert set(trials["ray_version"]) == {ray.__version__} and set(trials["python_version"]) == {platform.python_version()}
    assert set(trials["hostname"]) == {socket.gethostname()} and trials["cpu_model"].notna().all()
    assert set(trials["git_commit"]) == {submission["git"]} and submission["git"]
    assert all(e["environment"]["git_commit"] == submission["git"] for e in manifest["trials"].values())
    assert all(r.data.tags["orch.env.ray_version"] == ray.__version__ for r in runs)


def test_each_way_a_trial_fails_is_recorded_and_the_rest_complete(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    # x=2 raises; x=4 returns an artifact that is text, not bytes; x=5 and x=6 return an extra
    # column as a float and as a list (no schema holds both: whichever is stored second fails)
    grid = write_grid(tmp_path, experiment="fails", grid={}, zip={
        "x": [1, 2, 3, 4, 5, 6], "fail": [False, True, False, False, False, False],
        "text_artifact": [False, False, False, True, False, False],
        "extra_column": ["none", "none", "none", "none", "float", "list"]})
    by_x = {t.params["x"]: t.trial_id for t in expand(load_spec(grid), ToyKind())}
    # an earlier attempt of x=2 left tables (its driver was killed before the manifest said so)
    ExperimentStore(tmp_path / "r", "fails").write_table(
        "toy_summary", by_x[2], pa.table({"score": [99.0], "steps": [1], "pid": [1], "opened": [1]}), TOY_SUMMARY)
    outcome, store, manifest = submit(grid, tmp_path / "r")
    assert outcome.counts["done"] == 3 and outcome.counts["failed"] == 3 and outcome.error is None
    states = {x: manifest["trials"][tid]["state"] for x, tid in by_x.items()}
    assert [states[x] for x in (1, 2, 3, 4)] == ["done", "failed", "done", "failed"]
    assert sorted([states[5], states[6]]) == ["done", "failed"]
    # the tables hold the done trials only; `trials` has every one
    done = sorted(tid for tid, e in manifest["trials"].items() if e["state"] == "done")
    assert parquet_trial_ids(tmp_path / "r", "fails", "toy_summary") == done
    assert parquet_trial_ids(tmp_path / "r", "fails", "trials") == sorted(manifest["trials"])

    raised = by_x[2]
    entry = manifest["trials"][raised]
    assert entry["error"] == "RuntimeError: toy failure for x=2.0" and entry["attempts"] == 1
    traceback_text = (store.artifacts_dir(raised) / "traceback.txt").read_text()
    assert "Traceback" in traceback_text and "toy failure" in traceback_text
    trials = store.read_table("trials").to_pandas().set_index("trial_id")
    assert trials.loc[raised, "state"] == "failed" and "toy failure" in trials.loc[raised, "error"]
    runs = {r.data.tags["orch.trial_id"]: r for r in mlflow_trial_runs(tmp_path / "r", "fails")}
    assert runs[raised].info.status == "FAILED"
    assert "traceback.txt" in {a.path for a in _client(tmp_path).list_artifacts(runs[raised].info.run_id)}

    assert manifest["trials"][by_x[4]]["error"].startswith("could not store artifact 'note.txt': TypeError")

    clashed = by_x[5] if states[5] == "failed" else by_x[6]
    kept = store.artifacts_dir(clashed) / "unstored"
    assert manifest["trials"][clashed]["error"].startswith(f"could not store results (kept as they came in {kept}): ")
    assert pq.read_table(kept / "toy_summary.parquet").column("score").to_pylist() in ([50.0], [60.0])
    # the stored one's file is whole, on the schema it was written with
    stored = pq.read_table(store.table_file("toy_summary", by_x[6] if clashed == by_x[5] else by_x[5]))
    assert stored.column("extra").to_pylist() in ([1.5], [[1.5]])


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'r' / 'mlflow.db').resolve()}")


def _kill_when_started(pid_file: Path, kills: list[int], times: int = 1) -> threading.Thread:
    """SIGKILL the worker that wrote pid_file, ``times`` times (once per new attempt)."""

    def watch() -> None:
        seen = set()
        deadline = time.time() + 120
        while len(kills) < times and time.time() < deadline:
            if pid_file.exists():
                pid, _trial, attempt = pid_file.read_text().split()
                if attempt not in seen:
                    seen.add(attempt)
                    os.kill(int(pid), signal.SIGKILL)
                    kills.append(int(pid))
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigkilled_worker_is_retried_and_the_trial_completes(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    grid = write_grid(tmp_path, experiment="killed", grid={"x": [1]}, base={"pid_file": str(pid_file), "sleep_s": 2.0},
                      retries=1)
    kills: list[int] = []
    watcher = _kill_when_started(pid_file, kills, times=1)
    outcome, store, manifest = submit(grid, tmp_path / "r")
    watcher.join(5)
    assert len(kills) == 1
    (entry,) = manifest["trials"].values()
    assert entry["state"] == "done" and entry["attempts"] == 2
    summary = store.read_table("toy_summary").to_pandas()
    assert len(summary) == 1 and summary["pid"][0] != kills[0]  # the second attempt ran in a new process


def test_worker_killed_more_than_retries_is_failed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    grid = write_grid(tmp_path, experiment="dies", grid={"x": [1]}, base={"pid_file": str(pid_file), "sleep_s": 5.0},
                      retries=1)
    kills: list[int] = []
    watcher = _kill_when_started(pid_file, kills, times=2)
    outcome, _store, manifest = submit(grid, tmp_path / "r")
    watcher.join(5)
    (entry,) = manifest["trials"].values()
    assert len(kills) == 2 and entry["state"] == "failed" and entry["attempts"] == 2
    assert entry["error"].startswith("worker died 2 times")
    assert outcome.counts["failed"] == 1


def test_trial_over_timeout_is_killed_and_recorded(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    grid = write_grid(tmp_path, experiment="slow", grid={"x": [1], "sleep_s": [60.0, 0.0]}, base={"pid_file": str(pid_file)},
                      timeout_s=4)
    start = time.time()
    outcome, _store, manifest = submit(grid, tmp_path / "r")
    assert time.time() - start < 30
    states = {e["params"]["sleep_s"]: e for e in manifest["trials"].values()}
    assert states[60.0]["state"] == "timeout" and "timeout_s=4" in states[60.0]["error"]
    assert states[0.0]["state"] == "done"
    # the timed-out worker process is gone
    deadline = time.time() + 10
    slow_pid = None
    while time.time() < deadline:
        slow_pid = None
        try:
            pid, trial_id, _ = pid_file.read_text().split()
        except ValueError:
            continue
        slow_pid = int(pid)
        try:
            os.kill(slow_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {slow_pid} still alive")


def test_resubmission_runs_only_unfinished_trials(tmp_path: Path) -> None:
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="resume", grid={}, zip={"x": [1, 2, 3], "fail": [False, True, False]})
    first, _store, manifest = submit(grid, results)
    assert first.counts == {"done": 2, "running": 0, "failed": 1, "timeout": 0, "cancelled": 0, "queued": 0}
    done_before = {tid: e["end_s"] for tid, e in manifest["trials"].items() if e["state"] == "done"}
    # the same grid again: the done trials are skipped, the failed one runs (and fails) once more
    second, _store, manifest = submit(grid, results)
    assert second.counts["done"] == 2 and second.counts["failed"] == 1
    for tid, end in done_before.items():
        assert manifest["trials"][tid]["end_s"] == end  # not rerun
    failed = [tid for tid, e in manifest["trials"].items() if e["state"] == "failed"]
    assert manifest["trials"][failed[0]]["attempts"] == 2  # rerun once more
    assert len(manifest["submissions"]) == 2
    runs = mlflow_trial_runs(results, "resume")
    assert sorted(r.data.tags["orch.trial_id"] for r in runs) == sorted(manifest["trials"])  # no duplicates
    assert parquet_trial_ids(results, "resume", "trials") == sorted(manifest["trials"])
    # the grid with other resources: the done trials are kept, and the submission says they ran with others
    bigger = write_grid(tmp_path, "bigger.yaml", experiment="resume", grid={},
                        zip={"x": [1, 2, 3], "fail": [False, True, False]}, resources={"num_cpus": 2})
    progress = RecordedProgress()
    third, _store, manifest = submit(bigger, results, progress=progress)
    assert third.counts["done"] == 2 and all(manifest["trials"][tid]["end_s"] == end for tid, end in done_before.items())
    assert ("2 done trial(s) ran with other resources (num_cpus=1, now num_cpus=2); they are kept, not rerun: "
            "submit under a new experiment name to measure them again") in progress.events
    assert manifest["trials"][failed[0]]["resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_mlflow_unreachable_keeps_results_and_sync_logs_them_later(tmp_path: Path) -> None:
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="offline", grid={"x": [1, 2]})
    outcome, _store, manifest = submit(grid, results, tracking_uri="http://127.0.0.1:9")
    assert outcome.counts["done"] == 2 and outcome.tracking_error
    assert all(not e["synced"] for e in manifest["trials"].values())
    assert len(parquet_trial_ids(results, "offline", "toy_summary")) == 2
    listing = CliRunner().invoke(main, ["ls", "--results", str(results)])
    (row,) = [line for line in listing.output.splitlines() if "offline" in line]
    assert re.findall(r"\d+", row)[-1] == "2"  # two trials not yet in MLflow
    result = CliRunner().invoke(main, ["sync", "offline", "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert "synced 2 trial(s)" in result.output
    manifest = ExperimentStore(results, "offline").load_manifest()
    assert all(e["synced"] for e in manifest["trials"].values())
    runs = mlflow_trial_runs(results, "offline")
    assert sorted(r.data.tags["orch.trial_id"] for r in runs) == sorted(manifest["trials"])
    assert {r.data.metrics["score"] for r in runs} == {10.0, 20.0}
    again = CliRunner().invoke(main, ["sync", "offline", "--results", str(results)])
    assert "synced 0 trial(s)" in again.output and len(mlflow_trial_runs(results, "offline")) == 2
    # the tracking store is lost (or another one is named): sync fills the new one
    fresh = f"sqlite:///{tmp_path / 'new.db'}"
    refilled = CliRunner().invoke(main, ["sync", "offline", "--results", str(results), "--tracking-uri", fresh])
    assert refilled.exit_code == 0 and "synced 2 trial(s)" in refilled.output, refilled.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=fresh)
    runs = client.search_runs([client.get_experiment_by_name("offline").experiment_id])
    assert sorted(r.data.tags.get("orch.trial_id", "parent") for r in runs) == sorted([*manifest["trials"], "parent"])


def test_error_outside_a_trial_fails_the_submission_and_cancels_running_trials(tmp_path: Path, monkeypatch) -> None:
    grid = write_grid(tmp_path, experiment="disk-full", grid={}, zip={"x": [1, 2], "sleep_s": [0.2, 60.0]})
    write_row = ExperimentStore.write_trial_row

    def disk_full(self, trial_id, record, params):
        if record["state"] == "done":
            raise OSError(28, "No space left on device")
        return write_row(self, trial_id, record, params)

    monkeypatch.setattr(ExperimentStore, "write_trial_row", disk_full)
    start = time.time()
    outcome, _store, manifest = submit(grid, tmp_path / "r")
    assert time.time() - start < 50  # the 60 s trial was not waited for
    assert outcome.error and "No space left on device" in outcome.error
    submission = manifest["submissions"][-1]
    assert submission["status"] == "failed" and "No space left on device" in submission["error"]
    assert sorted(e["state"] for e in manifest["trials"].values()) == ["cancelled", "cancelled"]
    assert all("the submission failed" in e["error"] for e in manifest["trials"].values())


def test_a_trial_no_node_can_hold_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from orchestrator.placement import PlacementError

    grid = write_grid(tmp_path, experiment="too-big", grid={"x": [1, 2]}, resources={"num_cpus": 3})
    with pytest.raises(PlacementError, match=r"needs CPU=3, which no node can hold; node [0-9.]+: CPU=2 "):
        submit(grid, tmp_path / "r")
    assert not (tmp_path / "r" / "too-big" / "manifest.json").exists()


def test_timeout_counts_from_when_the_trials_workers_are_reserved(tmp_path: Path) -> None:
    from ray.util import placement_group, remove_placement_group

    from tests.support.kinds import ToyWorkersKind

    # Something outside this submission holds both CPUs for 6 s; the trial's two workers wait for
    # them without its 3 s timeout running, then start and finish.
    held = placement_group([{"CPU": 1.0}, {"CPU": 1.0}])
    ray.get(held.ready())
    threading.Timer(6.0, remove_placement_group, args=(held,)).start()
    grid = write_grid(tmp_path, experiment="reserve", grid={"x": [1]}, base={"workers": 2}, timeout_s=3,
                      kind="tests.support.kinds:ToyWorkersKind")
    spec = load_spec(grid)
    store = ExperimentStore(tmp_path / "r", spec.experiment)
    start = time.time()
    outcome = Submission(spec, ToyWorkersKind(), expand(spec, ToyWorkersKind()), store, None, refresh_s=0.2).run()
    (entry,) = store.load_manifest()["trials"].values()
    assert outcome.counts["done"] == 1, entry
    assert entry["start_s"] - start >= 5.0  # started once the workers' CPUs were free
