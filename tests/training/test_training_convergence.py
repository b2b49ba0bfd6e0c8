"""Convergence on CPU: two gloo workers, a small LSTM on KJV, every compressor (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from backends.compression import COMPRESSORS
from workloads.training.local import LocalEnv
from workloads.training.local import spawn_gloo_group as run_group
from workloads.training.loop import run_worker
from workloads.training.params import TrainingParams

STEPS = 300
# a2sgd's final perplexity over dense's at this seed and budget, measured (docs/training.md):
# 1.15 on the development machine; the test allows this factor.
A2SGD_FACTOR = 1.3
WELL_BELOW = 0.75  # every compressor must end below 75 % of the unigram perplexity


def lstm_params(name: str, lr: float = 20.0) -> TrainingParams:
    return TrainingParams.model_validate(
        {
            "workload": "lstm", "compressor": {"name": name}, "num_workers": 2,
            "optim": {"name": "sgd", "lr": lr, "clip": 0.25},
            "model": {"embed": 64, "hidden": 64, "layers": 1, "dropout": 0.0, "vocab_size": 2000},
            "steps": STEPS, "batch_size": 16, "bptt": 20, "eval_every": STEPS, "eval_batches": 40, "seed": 0,
        }
    )


def _train_all(rank: int, world_size: int, folder: str) -> dict:
    results = {}
    for name in sorted(COMPRESSORS):
        env = LocalEnv(rank, world_size, Path(folder) / name)
        state = run_worker(lstm_params(name), env)
        results[name] = state
        dist.barrier()
    cnn = TrainingParams.model_validate(
        {"workload": "cnn", "compressor": {"name": "topk", "ratio": 0.05}, "num_workers": 2,
         "optim": {"name": "adam", "lr": 2e-3, "clip": 0}, "model": {"channels": 8, "hidden": 32},
         "steps": 100, "batch_size": 32, "eval_every": 100, "eval_batches": 2, "seed": 0}
    )
    results["cnn"] = run_worker(cnn, LocalEnv(rank, world_size, Path(folder) / "cnn"))
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    return run_group(2, _train_all, str(tmp_path_factory.mktemp("conv")))[0]


def _final(state: dict, model: str = "rank0") -> dict:
    return [r for r in state["eval_rows"] if r["split"] == "valid" and r["model"] == model][-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_every_compressor_beats_the_unigram_baseline(trained: dict, name: str) -> None:
    state = trained[name]
    unigram = state["baseline"]["unigram_ppl"]
    assert 150 < unigram < 300  # the KJV valid split under training unigram frequencies (vocab 2,000)
    assert state["step"] == STEPS and len(state["step_rows"]) == STEPS
    assert _final(state)["ppl"] < WELL_BELOW * unigram, (name, _final(state)["ppl"], unigram)


@pytest.mark.slow
def test_a2sgd_final_perplexity_is_within_the_stated_factor_of_dense(trained: dict) -> None:
    dense, a2sgd = _final(trained["dense"])["ppl"], _final(trained["a2sgd"])["ppl"]
    assert a2sgd <= A2SGD_FACTOR * dense, (a2sgd, dense)
    # A2SGD's replicas drift apart (each applies its own sign pattern); dense replicas stay identical.
    assert _final(trained["a2sgd"])["divergence"] > 1e-4
    assert _final(trained["dense"])["divergence"] < 1e-5
    assert {r["payload_bytes"] for r in trained["a2sgd"]["step_rows"]} == {8}


@pytest.mark.slow
def test_cnn_with_adam_learns_fashion_mnist(trained: dict) -> None:
    assert _final(trained["cnn"])["accuracy"] > 0.6
