"""A step's timings hold that step's work only: two gloo workers, rank 0 evaluating between steps."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from workloads.training.local import LocalEnv, spawn_gloo_group
from workloads.training.loop import TrainingRun, run_worker
from workloads.training.params import TrainingParams

EVAL_EVERY = 3


def _rows_and_evaluation_spans(rank: int, world_size: int, folder: str) -> tuple[list[dict], list[float]]:
    torch.set_num_threads(1)
    spans: list[float] = []
    evaluate = TrainingRun.evaluate

    def timed(self: TrainingRun, *args: object) -> None:
        started = time.perf_counter()
        evaluate(self, *args)
        spans.append(time.perf_counter() - started)

    TrainingRun.evaluate = timed  # this spawned process's own class
    params = TrainingParams.model_validate({
        "workload": "lstm", "compressor": {"name": "a2sgd"}, "num_workers": 2,
        "model": {"embed": 32, "hidden": 32, "layers": 1, "dropout": 0.0, "vocab_size": 500},
        "steps": 7, "batch_size": 4, "bptt": 8, "eval_every": EVAL_EVERY, "eval_batches": 1000, "seed": 0,
    })
    return run_worker(params, LocalEnv(rank, world_size, Path(folder)))["step_rows"], spans


def test_rank0s_evaluation_is_not_the_other_ranks_next_communication(tmp_path: Path) -> None:
    (_, evaluations), (rows, _) = spawn_gloo_group(2, _rows_and_evaluation_spans, str(tmp_path))
    after_evaluation = [r for r in rows if r["step"] % EVAL_EVERY == 1 and r["step"] > 1]
    assert [r["step"] for r in after_evaluation] == [4, 7]
    for row, evaluation_s in zip(after_evaluation, evaluations, strict=False):
        assert evaluation_s > 0.05  # rank 0 was busy long enough for a wait to show
        # Without the wait after evaluations, rank 1's next step took the whole evaluation.
        assert row["step_s"] < 0.5 * evaluation_s and row["comm_s"] < 0.5 * evaluation_s, (row, evaluation_s)
