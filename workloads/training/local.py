"""Run a training trial's workers as local processes joined by gloo (no Ray): tests and debugging."""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backends.network import interface_counters
from workloads.training.loop import WorkerEnv, load_rank_state


class LocalEnv(WorkerEnv):
    """A local worker (CPU by default) whose checkpoints are files ``<dir>/step_<n>/rank<r>.pt``."""

    def __init__(
        self, rank: int, world_size: int, checkpoint_dir: Path, device: str = "cpu", interface: str | None = None
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.checkpoint_dir = checkpoint_dir
        self.interface = interface  # this worker's own network interface (in its namespace), if any

    def wire_counters(self) -> tuple[int, int] | None:
        """The interface's (tx, rx) byte counters."""
        return None if self.interface is None else interface_counters(self.interface)

    def prepare_model(self, model: nn.Module, ddp: bool, ddp_options: dict[str, Any] | None = None) -> nn.Module:
        """Move to the device; DDP for hook mode, one worker included (see WorkerEnv.prepare_model)."""
        model = model.to(self.device)
        return DistributedDataParallel(model, **(ddp_options or {})) if ddp else model

    def load_state(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's file for this rank."""
        steps = sorted(self.checkpoint_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for folder in reversed(steps):
            if len(list(folder.glob("rank*.pt"))) == self.world_size:
                return load_rank_state(folder / f"rank{self.rank}.pt", self.device)
        return None

    def save_state(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write this rank's file (atomically) into the step's folder."""
        folder = self.checkpoint_dir / f"step_{state['step']}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".rank{self.rank}.tmp"
        torch.save(state, tmp)
        tmp.rename(folder / f"rank{self.rank}.pt")


def _entry(
    rank: int, world_size: int, outdir: str, threads: int, fn: Callable[..., Any], args: tuple
) -> None:
    # A rank that aborts in C++ ("terminate called without an active exception", seen once in a
    # while at a fresh clone's first test) prints its Python stack to stderr on the signal.
    faulthandler.enable()
    torch.set_num_threads(threads)
    # Rendezvous through a file, not a port picked in advance: another process could take that port
    # in the seconds before rank 0 binds it (a spawned process imports torch first).
    dist.init_process_group("gloo", init_method=f"file://{Path(outdir) / 'rendezvous'}", rank=rank,
                            world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()  # now: tearing a group down mid-collective can abort before Python prints it
        raise
    finally:
        dist.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown, in which a gloo thread now
    # and then aborted the process after its work was done ("terminate called without an active
    # exception", no Python frame on any thread), failing a run whose results were complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo_group(world_size: int, fn: Callable[..., Any], *args: Any, threads: int = 1) -> list[Any]:
    """Run fn(rank, world_size, *args) in ``world_size`` spawned CPU processes joined by gloo;
    returns their results in rank order (``fn`` must be importable by name)."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _entry, args=(world_size, outdir, threads, fn, args), nprocs=world_size, start_method="spawn"
        )
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
