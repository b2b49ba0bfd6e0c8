"""Error feedback follows its parameters when DDP changes its bucket layout (rebuilds, restarts)."""

from __future__ import annotations

from pathlib import Path

import torch

from backends.compression.layout import bucket_key, carry_residual, key_positions
from workloads.training.local import LocalEnv, spawn_gloo_group
from workloads.training.loop import run_worker
from workloads.training.params import TrainingParams

SIZES = [2, 3, 1, 2]  # elements of the parameters at positions 0..3


def _flat(positions: list[int], values: dict[int, float]) -> torch.Tensor:
    return torch.cat([torch.full((SIZES[p],), values[p]) for p in positions])


def test_a_rebuild_carries_each_parameters_residual_and_drops_the_old_layout_last() -> None:
    values = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    first = [0, 1, 2, 3]  # DDP's first step: one bucket
    residuals = {bucket_key(first): _flat(first, values)}
    assert carry_residual(residuals, [3, 1], SIZES) == "params:3,1"
    assert torch.equal(residuals["params:3,1"], _flat([3, 1], values))
    assert list(residuals) == ["params:0,1,2,3", "params:3,1"]  # 0 and 2 are still only there
    carry_residual(residuals, [2, 0], SIZES)
    assert list(residuals) == ["params:3,1", "params:2,0"]
    assert torch.equal(residuals["params:2,0"], _flat([2, 0], values))


def test_a_restart_takes_the_newest_residuals_back_into_the_first_layout() -> None:
    # a checkpoint of the rebuilt layout, then the restarted run's first step: one bucket again
    residuals = {"params:3,1": _flat([3, 1], {3: 4.0, 1: 2.0}), "params:2,0": _flat([2, 0], {2: 3.0, 0: 1.0})}
    carry_residual(residuals, [0, 1, 2, 3], SIZES)
    assert list(residuals) == ["params:0,1,2,3"]
    assert torch.equal(residuals["params:0,1,2,3"], _flat([0, 1, 2, 3], {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}))


def test_a_parameter_no_residual_holds_starts_at_zero_and_known_keys_are_left_alone() -> None:
    residuals = {"params:1": torch.full((3,), 5.0)}
    carry_residual(residuals, [1, 2], SIZES)
    assert torch.equal(residuals["params:1,2"], torch.tensor([5.0, 5.0, 5.0, 0.0]))
    kept = residuals["params:1,2"]
    assert carry_residual(residuals, [1, 2], SIZES) == "params:1,2" and residuals["params:1,2"] is kept
    assert carry_residual({}, [0], SIZES) == "params:0" and key_positions("params:0") == [0]


def _hook_mode_residual_keys(rank: int, world_size: int, folder: str) -> list[str]:
    params = TrainingParams.model_validate({
        "workload": "lstm", "compressor": {"name": "topk", "ratio": 0.01, "mode": "hook"}, "num_workers": 2,
        "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 300},
        "steps": 4, "batch_size": 4, "bptt": 8, "eval_every": 100, "eval_batches": 1, "checkpoint_every": 4,
        "seed": 3,
    })
    run_worker(params, LocalEnv(rank, world_size, Path(folder)))
    state = torch.load(Path(folder) / "step_4" / f"rank{rank}.pt", weights_only=False)
    return list(state["applier"]["memory"])


def test_a_checkpoint_holds_each_parameters_residual_once(tmp_path: Path) -> None:
    # Before: the first step's layout kept its residual beside the rebuilt one, and a restarted
    # run's first step (that layout again) added it to the gradient.
    for keys in spawn_gloo_group(2, _hook_mode_residual_keys, str(tmp_path)):
        positions = [p for key in keys for p in key_positions(key)]
        assert sorted(positions) == list(range(7)) and len(keys) == 1, keys  # the LSTM's 7 tensors
