"""Placement without Ray: what trials need, and whether nodes can hold it."""

from __future__ import annotations

from orchestrator.placement import TrialNeeds, can_place, check_placeable
from orchestrator.spec import SpecError
from workloads.training.kind import TrainingKind
from workloads.training.params import TrainingParams


def test_training_counts_the_gpu_use_gpu_gives_each_worker() -> None:
    kind = TrainingKind()
    params = TrainingParams(num_workers=2, use_gpu=True)
    resources = {"num_cpus": 1.0, "num_gpus": 0.0}
    assert kind.worker_bundles(params, resources) == [{"num_cpus": 1.0, "num_gpus": 1.0}] * 2
    assert kind.footprint(params, resources) == {"num_cpus": 2.0, "num_gpus": 2.0}
    cpu_only = TrainingParams(num_workers=3)
    assert kind.footprint(cpu_only, {"num_cpus": 2.0, "num_gpus": 1.0}) == {"num_cpus": 6.0}


def test_workers_pack_across_nodes_but_a_bundle_never_splits() -> None:
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert can_place(TrialNeeds(actor={}, workers=[{"CPU": 1.0}] * 2), nodes)
    assert not can_place(TrialNeeds(actor={}, workers=[{"CPU": 1.0}] * 3), nodes)
    assert not can_place(TrialNeeds(actor={"CPU": 2.0}, workers=[]), nodes)  # the cluster has 2, no node has
    assert can_place(TrialNeeds(actor={"CPU": 1.0}, workers=[{"CPU": 1.0}]), nodes)
    try:
        check_placeable({"abc-0": TrialNeeds(actor={"CPU": 2.0}, workers=[])},
                        [("10.0.0.1", {"CPU": 1.0, "memory": 2 * 1024**3}), ("10.0.0.2", {"CPU": 1.0})])
    except SpecError as exc:
        assert str(exc) == ("trial abc-0 needs CPU=2, which no node can hold; "
                            "node 10.0.0.1: CPU=1 memory=2.0GiB; node 10.0.0.2: CPU=1")
    else:
        raise AssertionError("a trial bigger than every node must be refused")
