"""The training kind on Ray Train: a two-worker trial whose worker is SIGKILLed mid-run resumes,
its restarted workers again with the interconnect's NCCL environment."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from workloads.kind import TrialContext
from workloads.training.kind import TrainingKind
from workloads.training.ray_train import CONTROLLER_POLL_ENV, controller_poll_interval
from workloads.training.tables import TABLES

STEPS, EVERY = 240, 20


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def _registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train has recorded a checkpoint in its manager snapshot (not merely uploaded files)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("checkpoint_results"))


def _kill_rank1_after_first_checkpoint(workdir: Path, killed: dict) -> None:
    deadline = time.time() + 240
    run_dir = workdir / "ray_train" / "train"
    while time.time() < deadline:
        if _registered_checkpoint(run_dir) and (workdir / "pids" / "rank1.pid").exists():
            pid = int((workdir / "pids" / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes_from_its_checkpoint(local_ray, tmp_path: Path) -> None:
    kind = TrainingKind()
    params = kind.params_model.model_validate(
        {
            "workload": "lstm",
            "compressor": {"name": "a2sgd"},
            "num_workers": 2,
            "optim": {"name": "sgd", "lr": 5.0, "clip": 0.25},
            "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 500},
            "steps": STEPS, "batch_size": 8, "bptt": 10,
            "eval_every": 120, "eval_batches": 5, "checkpoint_every": EVERY, "max_failures": 2, "seed": 0,
            "interconnect": "sockets",
        }
    )
    ctx = TrialContext(experiment="t", trial_id="abc", repeat=0, attempt=1, workdir=tmp_path,
                       resources={"num_cpus": 1})
    killed: dict = {}
    killer = threading.Thread(target=_kill_rank1_after_first_checkpoint, args=(tmp_path, killed), daemon=True)
    killer.start()
    out = kind.run(None, params, ctx)
    killer.join(timeout=1)
    assert killed, "the worker was never killed"
    assert int((tmp_path / "pids" / "rank1.pid").read_text()) != killed["pid"]  # a new worker took over

    for name, schema in TABLES.items():
        assert out.tables[name].schema.equals(schema, check_metadata=True), name
    summary = out.tables["train_summary"].to_pylist()[0]
    assert summary["restarts"] >= 1
    assert summary["resumed_from_step"] % EVERY == 0 and 0 < summary["resumed_from_step"] < STEPS
    assert summary["steps"] == STEPS and summary["num_workers"] == 2
    # The final state comes from the restarted group: Ray Train's backend set the variables in its workers too.
    assert summary["nccl_env"] == "NCCL_IB_DISABLE=1,NCCL_NVLS_ENABLE=0,NCCL_P2P_DISABLE=1,NCCL_SHM_DISABLE=1"
    assert summary["nccl_paths"] is None  # gloo on CPU: no NCCL log
    assert 0 < summary["step_compute_s"] < summary["step_time_s"] and summary["step_comm_s"] > 0
    # Every step appears exactly once per rank: rows after the last checkpoint of the dead attempt are gone.
    steps = out.tables["train_steps"].to_pylist()
    for rank in (0, 1):
        assert sorted(r["step"] for r in steps if r["rank"] == rank) == list(range(1, STEPS + 1))
    assert {r["attempt"] for r in steps} >= {0, 1}
    # A2SGD's flat path: 2 fp32 scalars per worker per step, ring-counted.
    assert {r["payload_bytes"] for r in steps} == {8}
    assert {r["bytes_sent"] for r in steps} == {8}  # 2 (p-1)/p x 8 at p = 2
    assert summary["bytes_sent_total"] == 2 * STEPS * 8
    assert summary["comm_model_s_1gbit"] == pytest.approx(STEPS * 8 * 8 / 1e9)
    evals = pa.Table.to_pylist(out.tables["train_evals"])
    assert {(r["split"], r["model"]) for r in evals} == {
        ("valid", "rank0"), ("valid", "average"), ("test", "rank0"), ("test", "average")}
    assert summary["final_ppl"] < summary["unigram_ppl"] * 1.5  # a tiny model, a few hundred steps
    assert all(r["divergence"] >= 0 for r in evals)


def test_ray_train_s_controller_polls_every_half_second_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.v2._internal.constants import get_env_vars_to_propagate  # what fit() hands its controller

    monkeypatch.delenv(CONTROLLER_POLL_ENV, raising=False)
    with controller_poll_interval():
        assert get_env_vars_to_propagate()[CONTROLLER_POLL_ENV] == "0.5"
    assert CONTROLLER_POLL_ENV not in os.environ
    monkeypatch.setenv(CONTROLLER_POLL_ENV, "3")
    with controller_poll_interval():
        assert get_env_vars_to_propagate()[CONTROLLER_POLL_ENV] == "3"
    assert os.environ[CONTROLLER_POLL_ENV] == "3"
