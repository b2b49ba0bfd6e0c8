"""Resuming from a checkpoint: bit-identical continuation on CPU, RNG states kept on CPU under any map."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from workloads.training.local import LocalEnv, spawn_gloo_group
from workloads.training.loop import TrainingRun, load_rank_state, run_worker
from workloads.training.params import TrainingParams

STEPS, EVERY = 8, 4


def _params(steps: int, workers: int = 2) -> TrainingParams:
    # qsgd draws from its own generator, dropout from the global one, the LSTM carries its state:
    # every stream a resumed run must continue. Flat mode: in hook mode DDP's first step after a
    # restart runs on its initial bucket layout (it rebuilds buckets after one iteration), which
    # changes qsgd's bucket boundaries for that one step (docs/training.md).
    return TrainingParams.model_validate(
        {
            "workload": "lstm", "compressor": {"name": "qsgd", "levels": 15, "mode": "flat"}, "num_workers": workers,
            "optim": {"name": "sgd", "lr": 5.0, "clip": 0.25},
            "model": {"embed": 16, "hidden": 16, "layers": 2, "dropout": 0.3, "vocab_size": 300},
            "steps": steps, "batch_size": 4, "bptt": 8, "eval_every": 100, "eval_batches": 2,
            "checkpoint_every": EVERY, "seed": 3,
        }
    )


def _straight_and_resumed(rank: int, world_size: int, folder: str) -> dict:
    straight = run_worker(_params(STEPS), LocalEnv(rank, world_size, Path(folder) / "straight"))
    dist.barrier()
    run_worker(_params(EVERY), LocalEnv(rank, world_size, Path(folder) / "resumed"))  # stops at EVERY
    dist.barrier()
    resumed = run_worker(_params(STEPS), LocalEnv(rank, world_size, Path(folder) / "resumed"))
    keep = ("model", "step_rows", "restarts")
    return {"straight": {k: straight[k] for k in keep}, "resumed": {k: resumed[k] for k in keep}}


def test_a_resumed_run_continues_bit_identically(tmp_path: Path) -> None:
    for rank, out in enumerate(spawn_gloo_group(2, _straight_and_resumed, str(tmp_path))):
        straight, resumed = out["straight"], out["resumed"]
        assert resumed["restarts"] == [EVERY]
        assert [r["loss"] for r in resumed["step_rows"]] == [r["loss"] for r in straight["step_rows"]], rank
        for name, value in straight["model"].items():
            assert torch.equal(value, resumed["model"][name]), (rank, name)


def test_rng_states_stay_cpu_byte_tensors_under_a_device_map(tmp_path: Path) -> None:
    # No GPU here: the "meta" device stands in for CUDA. Whatever device a checkpoint is mapped
    # onto, torch.set_rng_state and Generator.set_state need CPU byte tensors.
    torch.set_num_threads(1)
    env = LocalEnv(0, 1, tmp_path)
    run = TrainingRun(_params(2, workers=1), env)
    run.run()
    path = next(tmp_path.glob("step_2/rank0.pt"))
    state = load_rank_state(path, torch.device("meta"))
    rngs = [state["rng"]["cpu"], state["applier"]["compressor"]["generator"]]
    for rng in rngs:
        assert rng.device.type == "cpu" and rng.dtype == torch.uint8
    assert torch.equal(state["rng"]["cpu"], torch.load(path, weights_only=False)["rng"]["cpu"])
    assert {t.device.type for t in state["model"].values()} == {"meta"}
    assert {h.device.type for h in state["task"]["hidden"][0]} == {"meta"}
