"""Ray Train launch: a ``TorchTrainer`` whose workers run ``loop.run_worker``.

Checkpoints: every rank writes ``rank<r>.pt`` into the checkpoint it reports, so one Ray
checkpoint holds every rank's model, optimizer, compressor state and rows. Ray Train V2
restarts a failed worker group (``FailureConfig.max_failures``) and the workers resume from
``ray.train.get_checkpoint()``; a retried trial (same ``storage_path`` under the trial's
workdir and the same run name) restores Ray's checkpoint manager and resumes too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workloads.training.interconnect import LOG_FOLDER, nccl_env
from workloads.training.loop import WorkerEnv, load_rank_state, record_pid, run_worker
from workloads.training.params import TrainingParams, worker_resources

RUN_NAME = "train"
# Ray Train's controller takes the workers' reports once per poll (every 2 s by default), and a
# worker holds at most one report it has not taken: checkpoints closer than that stall every
# worker until the next poll (docs/training.md has a measured case).
# Polling every 0.5 s keeps short steps from waiting; Ray Train reads the variable from the
# process that calls fit() and passes it on to its controller. A user's own setting wins.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.5"


class RayTrainEnv(WorkerEnv):
    """A Ray Train worker: rank and device from the train context, checkpoints through ray.train.report."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        self.device = device[0] if isinstance(device, list) else device

    def prepare_model(self, model: nn.Module, ddp: bool, ddp_options: dict[str, Any] | None = None) -> nn.Module:
        """Ray's prepare_model: DDP (with ``ddp_options``) for hook mode (one worker too), none for flat mode."""
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if ddp else None,
                                              parallel_strategy_kwargs=ddp_options or None)
        if ddp and not isinstance(model, DistributedDataParallel):
            # Ray wraps only when there are several workers; see WorkerEnv.prepare_model.
            device_ids = [self.device] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, **(ddp_options or {}))
        return model

    def load_state(self) -> dict[str, Any] | None:
        """This rank's file from the latest reported checkpoint."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_rank_state(Path(folder) / f"rank{self.rank}.pt", self.device)

    def save_state(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Report metrics with a checkpoint holding this rank's state file."""
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / f"rank{self.rank}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: record our PID (for fault tests), then train."""
    env = RayTrainEnv()
    if config.get("report") is not None:
        env.report = config["report"]
    record_pid(config["workdir"], env.rank)
    if env.device.type != "cuda":
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    run_worker(TrainingParams.model_validate(config["params"]), env)
    getattr(env.report, "flush", lambda: None)()  # the last live records


@contextmanager
def controller_poll_interval() -> Iterator[None]:
    """While Ray Train starts its controller: ``CONTROLLER_POLL_S`` unless the user set one."""
    if CONTROLLER_POLL_ENV in os.environ:
        yield
        return
    os.environ[CONTROLLER_POLL_ENV] = CONTROLLER_POLL_S
    try:
        yield
    finally:
        os.environ.pop(CONTROLLER_POLL_ENV, None)


def ray_resources(resources: dict[str, float]) -> dict[str, float]:
    """Grid resource keys (num_cpus, num_gpus, custom) -> Ray Train's (CPU, GPU, custom)."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return {names.get(k, k): float(v) for k, v in resources.items() if v}


def storage(params: TrainingParams, workdir: Path, trial_name: str) -> tuple[str, str]:
    """Ray Train's (storage_path, run name): the grid's shared storage_path with a run per trial,
    else the trial's own folder (enough on one node)."""
    if params.storage_path is not None:
        return params.storage_path, trial_name
    return str(workdir / "ray_train"), RUN_NAME


def fit(
    params: TrainingParams,
    workdir: Path,
    resources: dict[str, float],
    trial_name: str = RUN_NAME,
    report: Callable[..., None] | None = None,
) -> list[dict[str, Any]]:
    """Run the trainer to completion; returns each rank's final state (from the last checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workloads.training.process_group import LoopbackTorchConfig

    per_worker = ray_resources(worker_resources(params, resources))
    storage_path, run_name = storage(params, workdir, trial_name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "workdir": str(workdir),
            "threads": max(1, int(per_worker["CPU"])),
            "report": report,
        },
        scaling_config=ScalingConfig(
            num_workers=params.num_workers, use_gpu=params.use_gpu, resources_per_worker=per_worker
        ),
        torch_config=LoopbackTorchConfig(
            backend="nccl" if params.use_gpu else "gloo", store_dir=str(workdir / "rendezvous"),
            env=nccl_env(params.interconnect, workdir / LOG_FOLDER if params.use_gpu else None),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=params.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with controller_poll_interval():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    states = []
    with result.checkpoint.as_directory() as folder:
        for rank in range(params.num_workers):
            states.append(torch.load(Path(folder) / f"rank{rank}.pt", map_location="cpu", weights_only=False))
    return states
