"""Run a training trial's workers as local processes joined by gloo (no Ray): tests and debugging."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workloads.training.loop import WorkerEnv, run_worker
from workloads.training.params import TrainingParams


class LocalEnv(WorkerEnv):
    """A CPU worker whose checkpoints are files ``<dir>/step_<n>/rank<r>.pt``."""

    def __init__(self, rank: int, world_size: int, checkpoint_dir: Path) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.checkpoint_dir = checkpoint_dir

    def prepare_model(self, model: nn.Module, ddp: bool) -> nn.Module:
        """DDP only for several workers, as Ray's prepare_model does."""
        return DistributedDataParallel(model) if ddp and self.world_size > 1 else model

    def load_state(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's file for this rank."""
        steps = sorted(self.checkpoint_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for folder in reversed(steps):
            if len(list(folder.glob("rank*.pt"))) == self.world_size:
                return torch.load(folder / f"rank{self.rank}.pt", weights_only=False)
        return None

    def save_state(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write this rank's file (atomically) into the step's folder."""
        folder = self.checkpoint_dir / f"step_{state['step']}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".rank{self.rank}.tmp"
        torch.save(state, tmp)
        tmp.rename(folder / f"rank{self.rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, params_json: str, checkpoint_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        run_worker(TrainingParams.model_validate_json(params_json), LocalEnv(rank, world_size, Path(checkpoint_dir)))
    finally:
        dist.destroy_process_group()


def run_local(params: TrainingParams, checkpoint_dir: Path, threads_per_worker: int = 1) -> list[dict[str, Any]]:
    """Train with ``params.num_workers`` local gloo processes; returns each rank's final state."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _entry,
        args=(params.num_workers, _free_port(), params.model_dump_json(), str(checkpoint_dir), threads_per_worker),
        nprocs=params.num_workers,
        start_method="spawn",
    )
    env = LocalEnv(0, params.num_workers, checkpoint_dir)
    return [LocalEnv(r, params.num_workers, checkpoint_dir).load_state() for r in range(env.world_size)]
