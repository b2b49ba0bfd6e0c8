"""Run a function in p local processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, outdir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_group(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) in each process; returns the ranks' results in rank order."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _entry, args=(world_size, _free_port(), outdir, fn, args), nprocs=world_size, start_method="spawn"
        )
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
