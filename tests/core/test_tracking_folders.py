"""One MLflow server, two results folders holding an experiment of the same name: neither replaces the other's runs."""

from __future__ import annotations

from pathlib import Path

from orchestrator.store import ExperimentStore
from orchestrator.tracking import STORE_TAG, Tracker

RECORD = {"state": "done", "params": {"x": 1}, "repeat": 0, "attempts": 1}


def test_two_results_folders_of_one_experiment_name_keep_their_own_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'shared.db'}"  # a team's shared tracking server
    stores = ExperimentStore(tmp_path / "laptop", "exp"), ExperimentStore(tmp_path / "cluster", "exp")
    laptop, cluster = (Tracker(store, uri) for store in stores)
    assert laptop.available and cluster.available and stores[0].store_id != stores[1].store_id
    # the same grid gives the same trial id in both folders
    on_laptop = laptop.log_trial("t-0", RECORD, None, laptop.existing_runs().get("t-0", []))
    on_cluster = cluster.log_trial("t-0", RECORD, None, cluster.existing_runs().get("t-0", []))
    assert laptop.existing_runs() == {"t-0": [on_laptop]} and cluster.existing_runs() == {"t-0": [on_cluster]}
    # a rerun on the cluster replaces the cluster's run, and only that one
    again = cluster.log_trial("t-0", RECORD, None, cluster.existing_runs()["t-0"])
    assert laptop.existing_runs() == {"t-0": [on_laptop]} and cluster.existing_runs() == {"t-0": [again]}
    assert laptop.client.get_run(on_laptop).info.lifecycle_stage == "active"
    assert laptop.client.get_run(on_laptop).data.tags[STORE_TAG] == stores[0].store_id


def test_a_folder_keeps_its_id_and_runs_from_before_the_tag_count_as_its_own(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path, "exp")
    first = store.store_id
    assert ExperimentStore(tmp_path, "exp").store_id == first and len(first) == 32
    tracker = Tracker(store, f"sqlite:///{tmp_path / 'mlflow.db'}")
    untagged = tracker.client.create_run(tracker.experiment_id, run_name="t-0",
                                         tags={"orch.trial_id": "t-0"}).info.run_id
    assert tracker.existing_runs() == {"t-0": [untagged]}
