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


def _step_as_if_on_a_gpu_host(rank: int, world_size: int) -> tuple[bool, int]:
    # PyTorch's hook synchronizes "the bucket's device" whenever CUDA is available: on a host with
    # a GPU that raised for CPU buckets (this CPU-only process is told CUDA is available).
    from torch.nn.parallel import DistributedDataParallel

    from backends.compression import CompressionConfig
    from backends.compression.apply import build_applier

    torch.cuda.is_available = lambda: True
    torch.manual_seed(0)
    ddp = DistributedDataParallel(torch.nn.Linear(32, 16, bias=False))
    applier = build_applier(CompressionConfig(name="powersgd", rank=1, start_iter=2), ddp)
    for step in range(3):  # two dense steps, then the hook compresses
        if step == 2:
            applier.take_stats()
        ddp.zero_grad()
        ddp(torch.randn(8, 32)).pow(2).sum().backward()
    return torch.cuda.is_available(), applier.take_stats().bytes_sent


def test_powersgd_cpu_buckets_run_on_a_host_where_cuda_is_available(tmp_path: Path) -> None:
    for cuda_said_available, sent in spawn_gloo_group(2, _step_as_if_on_a_gpu_host):
        assert cuda_said_available and sent == (16 + 32) * 4  # one rank-1 P (16) and Q (32), fp32
