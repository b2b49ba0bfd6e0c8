"""A local multi-node Ray cluster: custom-resource pinning, and a node lost mid-grid."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator.expand import expand
from orchestrator.placement import PlacementError
from orchestrator.scheduler import Submission
from orchestrator.spec import load_spec
from orchestrator.store import ExperimentStore
from orchestrator.tracking import Tracker
from tests.core.helpers import mlflow_trial_runs, parquet_trial_ids, write_grid
from tests.support.kinds import ToyKind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    # The driver attaches to the head's raylet before the worker nodes exist, so either
    # worker node can be removed without cutting the driver off.
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    nodes = {
        "a": cluster.add_node(num_cpus=1, resources={"node_a": 1, "pool": 1}),
        "b": cluster.add_node(num_cpus=1, resources={"node_b": 1, "pool": 1}),
    }
    cluster.wait_for_nodes()
    yield cluster, {name: node.node_id for name, node in nodes.items()}, nodes
    ray.shutdown()
    cluster.shutdown()


def _submission(grid: Path, results: Path, **options) -> Submission:
    spec = load_spec(grid)
    store = ExperimentStore(results, spec.experiment)
    return Submission(spec, ToyKind(), expand(spec, ToyKind()), store, Tracker(store), refresh_s=0.2, **options)


def test_trials_pinned_by_custom_resources_land_on_their_node(cluster, tmp_path: Path) -> None:
    _cluster, node_ids, _nodes = cluster
    results = tmp_path / "r"
    for name in ("a", "b"):
        grid = write_grid(tmp_path, f"{name}.yaml", experiment=f"pin-{name}", grid={"x": [1, 2, 3]},
                          resources={"num_cpus": 1, f"node_{name}": 1})
        outcome = _submission(grid, results).run()
        assert outcome.counts["done"] == 3
        manifest = ExperimentStore(results, f"pin-{name}").load_manifest()
        assert {e["node"] for e in manifest["trials"].values()} == {node_ids[name]}


def test_trials_of_a_removed_node_rerun_elsewhere(cluster, tmp_path: Path) -> None:
    ray_cluster, node_ids, nodes = cluster
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="lose-node", grid={"x": [1, 2, 3, 4]}, base={"sleep_s": 4.0},
                      resources={"num_cpus": 1, "pool": 1}, retries=2)
    submission = _submission(grid, results)
    outcome_box = {}
    runner = threading.Thread(target=lambda: outcome_box.setdefault("outcome", submission.run()))
    runner.start()
    store = ExperimentStore(results, "lose-node")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until both nodes run a trial
        manifest = store.load_manifest() or {"trials": {}}
        if sum(e["state"] == "running" for e in manifest["trials"].values()) == 2:
            break
        time.sleep(0.2)
    time.sleep(1.5)  # the trials are inside their sleep now
    ray_cluster.remove_node(nodes["a"], allow_graceful=False)
    runner.join(240)
    assert not runner.is_alive()
    outcome = outcome_box["outcome"]
    manifest = store.load_manifest()
    assert outcome.counts["done"] == 4
    entries = manifest["trials"]
    retried = [e for e in entries.values() if e["attempts"] > 1]
    assert retried, "a trial on the removed node must have been retried"
    assert all(e["node"] == node_ids["b"] for e in retried)
    # nothing lost or duplicated: one Parquet partition, one row, one MLflow run per trial
    ids = sorted(entries)
    assert parquet_trial_ids(results, "lose-node", "toy_summary") == ids
    summary = store.read_table("toy_summary").to_pandas()
    assert sorted(summary["trial_id"].astype(str)) == ids
    assert sorted(r.data.tags["orch.trial_id"] for r in mlflow_trial_runs(results, "lose-node")) == ids


def test_a_trial_bigger_than_every_node_is_refused_though_the_cluster_has_enough(cluster, tmp_path: Path) -> None:
    # Two 1-CPU nodes: the cluster has 2 CPUs, no node has; admission by cluster totals hung here.
    grid = write_grid(tmp_path, experiment="no-fit", grid={"x": [1]}, resources={"num_cpus": 2})
    with pytest.raises(PlacementError, match=r"needs CPU=2, which no node can hold; node .*CPU=1"):
        _submission(grid, tmp_path / "r").run()


def test_trials_fail_after_a_bounded_wait_when_their_only_node_leaves(cluster, tmp_path: Path) -> None:
    ray_cluster, _node_ids, _nodes = cluster
    node_c = ray_cluster.add_node(num_cpus=1, resources={"node_c": 1})
    ray_cluster.wait_for_nodes()
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="node-gone", grid={"x": [1, 2, 3]}, base={"sleep_s": 30.0},
                      resources={"num_cpus": 1, "node_c": 1}, retries=1)
    submission = _submission(grid, results, placement_wait_s=2.0)
    outcome_box = {}
    runner = threading.Thread(target=lambda: outcome_box.setdefault("outcome", submission.run()))
    runner.start()
    store = ExperimentStore(results, "node-gone")
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        e["state"] == "running" and e.get("start_s") for e in (store.load_manifest() or {"trials": {}})["trials"].values()
    ):
        time.sleep(0.2)
    ray_cluster.remove_node(node_c, allow_graceful=False)
    runner.join(90)
    assert not runner.is_alive(), "the submission hung after its node left"
    outcome = outcome_box["outcome"]
    assert outcome.counts["failed"] == 3
    errors = [e["error"] for e in store.load_manifest()["trials"].values()]
    assert all("no node can hold CPU=1 node_c=1 any more (waited 2s)" in error for error in errors), errors
