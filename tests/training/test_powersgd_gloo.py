"""PowerSGD (PyTorch's own hook) on gloo with a model DDP would split into several buckets."""

from __future__ import annotations

from pathlib import Path

import torch

from backends.compression.layout import key_positions
from workloads.training.local import LocalEnv, spawn_gloo_group
from workloads.training.loop import TrainingRun
from workloads.training.params import TrainingParams


def _train(rank: int, world_size: int, folder: str) -> tuple[int, list[int]]:
    torch.set_num_threads(1)
    params = TrainingParams.model_validate({
        "workload": "lstm", "compressor": {"name": "powersgd", "rank": 1, "start_iter": 2}, "num_workers": 2,
        # 2.6 MB of gradients: DDP by default rebuilds them into a first bucket of 1 MiB and the rest
        "model": {"embed": 128, "hidden": 128, "layers": 1, "dropout": 0.0, "vocab_size": 2000},
        "steps": 8, "batch_size": 4, "bptt": 8, "eval_every": 100, "eval_batches": 1, "checkpoint_every": 4,
        "seed": 0,
    })
    run = TrainingRun(params, LocalEnv(rank, world_size, Path(folder)))
    final = run.run()
    buckets = len(run.model._get_ddp_logging_data().get("bucket_sizes", "").split(", "))
    saved = torch.load(Path(folder) / "step_4" / f"rank{rank}.pt", weights_only=False)["applier"]["compressor"]
    shapes = [p.numel() for p in run.module.parameters()]
    return buckets, [r["bytes_sent"] for r in final["step_rows"]], saved, shapes


def test_powersgd_runs_on_gloo_with_the_gradient_in_one_bucket(tmp_path: Path) -> None:
    # PyTorch's hook issues its P and Q all-reduces from callbacks on gloo's threads: with two
    # buckets the ranks issued them in different orders (gloo: "collective mismatch", or a hang).
    results = spawn_gloo_group(2, _train, str(tmp_path))
    for buckets, sent, saved, sizes in results:
        assert buckets == 1
        assert sent[0] == sent[1] > 2_000_000  # dense before start_iter: the whole gradient
        assert all(0 < s < sent[0] / 20 for s in sent[2:])  # then the rank-1 factors
        # Error feedback is saved by parameters (each of the model's tensors once), not by
        # bucket index, which a restarted run's first step (DDP's first layout) would not match.
        (key,) = saved["residuals"]
        assert sorted(key_positions(key)) == list(range(len(sizes)))
        assert saved["residuals"][key].numel() == sum(sizes)
        assert "error_dict" not in saved["powersgd"] and saved["powersgd"]["iter"] == 4
