"""A one-worker trial runs the compressor it names: PowerSGD's hook changes the gradient even alone."""

from __future__ import annotations

from pathlib import Path

from workloads.training.local import LocalEnv, spawn_gloo_group
from workloads.training.loop import run_worker
from workloads.training.params import TrainingParams

STEPS = 6


def _params(name: str) -> TrainingParams:
    return TrainingParams.model_validate(
        {
            "workload": "lstm", "num_workers": 1, "steps": STEPS, "seed": 1,
            "compressor": {"name": name, "rank": 1, "start_iter": 2, "mode": "hook"},
            "optim": {"name": "sgd", "lr": 5.0, "clip": 0.25},
            "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 300},
            "batch_size": 4, "bptt": 8, "eval_every": 100, "eval_batches": 1, "checkpoint_every": 100,
        }
    )


def _losses_and_bytes(rank: int, world_size: int, folder: str) -> dict:
    out = {}
    for name in ("dense", "powersgd"):
        rows = run_worker(_params(name), LocalEnv(rank, world_size, Path(folder) / name))["step_rows"]
        out[name] = ([r["loss"] for r in rows], [r["payload_bytes"] for r in rows])
    return out


def test_one_worker_powersgd_is_not_silently_dense(tmp_path: Path) -> None:
    (result,) = spawn_gloo_group(1, _losses_and_bytes, str(tmp_path))
    dense_loss, dense_bytes = result["dense"]
    powersgd_loss, powersgd_bytes = result["powersgd"]
    # Before start_iter PowerSGD sends the dense bucket, so the first steps are the same run.
    assert powersgd_loss[:3] == dense_loss[:3]
    assert powersgd_bytes[:2] == dense_bytes[:2]
    # From start_iter on the rank-1 approximation changes the updates and shrinks the payload.
    assert powersgd_loss[3:] != dense_loss[3:]
    assert all(p < d / 4 for p, d in zip(powersgd_bytes[2:], dense_bytes[2:], strict=True))
