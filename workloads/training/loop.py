"""The per-worker training loop, independent of how workers are launched (Ray Train or local).

Each step: forward + backward (compute; in hook mode DDP's hook compresses and communicates
inside backward, and that time is moved out of compute), the flat sync (flat mode), gradient
clipping and the optimizer step. Every ``eval_every`` steps: replica divergence and the
validation quality of rank 0's model and of the averaged model. Every ``checkpoint_interval``
steps each rank saves its model, optimizer, compressor/error-feedback state and its rows.
"""

from __future__ import annotations

import copy
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backends.compression import build_applier, ddp_options, mode_of
from backends.compression.sync import wait_device
from workloads.training.interconnect import seen_env
from workloads.training.params import TrainingParams
from workloads.training.tasks import Task, build_task

# Step-row columns that identify a row rather than measure it: not sent as live metrics.
LIVE_SKIP = frozenset({"rank", "step", "epoch", "attempt"})

# Keys whose tensors are RNG states: torch.set_rng_state and Generator.set_state take CPU byte
# tensors only, whatever device the rest of the checkpoint is loaded onto.
RNG_KEYS = frozenset({"rng", "generator"})


def to_device(state: Any, device: torch.device) -> Any:
    """``state`` with every tensor moved to ``device``, except RNG states (under RNG_KEYS), kept on CPU."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: v if k in RNG_KEYS else to_device(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_device(v, device) for v in state)
    return state


def record_pid(workdir: str | Path, rank: int) -> None:
    """Write this worker's PID to ``workdir/pids/rank<rank>.pid`` (fault tests and the cut-off test
    find workers there), atomically: a reader never sees the file created but still empty."""
    pid_dir = Path(workdir) / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    staged = pid_dir / f".rank{rank}.pid.{os.getpid()}"
    staged.write_text(str(os.getpid()))
    os.replace(staged, pid_dir / f"rank{rank}.pid")


def load_rank_state(path: Any, device: torch.device) -> dict[str, Any]:
    """A rank's checkpoint file, read on CPU, then moved to ``device`` except its RNG states."""
    return to_device(torch.load(path, map_location="cpu", weights_only=False), device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The process's RNG streams this worker draws from: CPU, and the device's own on CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class WorkerEnv(ABC):
    """Where a worker runs: its rank, device, model wrapping and checkpoint storage."""

    rank: int
    world_size: int
    device: torch.device
    # Live metrics (the trial's ``ctx.report``): rank 0 reports each step and evaluation.
    report: Callable[..., None] = staticmethod(lambda _record, step=None: None)

    @abstractmethod
    def prepare_model(self, model: nn.Module, ddp: bool, ddp_options: dict[str, Any] | None = None) -> nn.Module:
        """Move to the device; wrap in DDP (with ``ddp_options``) when ``ddp``, also for one worker.

        A hook changes the gradient even with no peer (PowerSGD's low-rank approximation and its
        error feedback), so a one-worker trial without DDP would silently measure dense.
        """

    @abstractmethod
    def load_state(self) -> dict[str, Any] | None:
        """This rank's state from the latest checkpoint, or None on a fresh start."""

    @abstractmethod
    def save_state(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Checkpoint this rank's state (every rank calls this at the same step)."""

    def wire_counters(self) -> tuple[int, int] | None:
        """(tx, rx) bytes of this worker's network interface, where it has one of its own."""
        return None


def _optimizer(params: TrainingParams, model: nn.Module) -> torch.optim.Optimizer:
    o = params.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def total_steps(params: TrainingParams, task: Task) -> int:
    """The step budget: ``steps``, or ``epochs`` x steps per epoch (one epoch by default)."""
    if params.steps is not None:
        return params.steps
    return max(1, round((params.epochs or 1.0) * task.steps_per_epoch()))


class TrainingRun:
    """State and steps of one worker's run."""

    def __init__(self, params: TrainingParams, env: WorkerEnv) -> None:
        self.params, self.env = params, env
        self.task = build_task(params, env.rank, env.world_size, env.device)
        if self.task.steps_per_epoch() < 1:  # before anything is built: the first step would divide by 0
            raise ValueError(f"a worker's share of the {params.workload} training data holds no step: "
                             f"{env.world_size} workers x batch_size {params.batch_size} (and bptt for lstm) "
                             "exceed it; lower batch_size or num_workers")
        torch.manual_seed(params.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        self.mode = mode_of(params.compressor)
        ddp = self.mode == "hook"  # DDP needs a process group; flat mode runs without one too
        options = ddp_options(params.compressor, dist.get_backend()) if ddp else None
        self.model = env.prepare_model(model, ddp=ddp, ddp_options=options)
        self.module = _unwrap(self.model)
        self.applier = build_applier(params.compressor, self.model, seed=params.seed)
        self.optimizer = _optimizer(params, self.model)
        self.steps = total_steps(params, self.task)
        self.per_epoch = self.task.steps_per_epoch()
        self.step = 0
        self.train_s = 0.0
        self.time_to_target_s: float | None = None
        self.step_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.restarts: list[int] = []  # steps a restarted attempt resumed from
        torch.manual_seed(params.seed * 7919 + env.rank + 1)  # per-rank dropout streams
        self._restore()

    # ---- checkpoints -------------------------------------------------------------------
    def _restore(self) -> None:
        state = self.env.load_state()
        if state is None:
            return
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.applier.load_state_dict(state["applier"])
        memory = getattr(self.applier, "memory", None)
        if hasattr(memory, "to"):
            memory.to(self.env.device)
        set_rng_state(state["rng"], self.env.device)
        self.step, self.train_s = state["step"], state["train_s"]
        self.time_to_target_s = state["time_to_target_s"]
        self.step_rows, self.eval_rows = state["step_rows"], state["eval_rows"]
        self.restarts = [*state["restarts"], self.step]
        self.task.load_state_dict(state["task"])

    def state(self) -> dict[str, Any]:
        """Everything this rank needs to resume (and the rows it has produced)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "applier": self.applier.state_dict(),
            "rng": rng_state(self.env.device),
            "task": self.task.state_dict(),
            "step": self.step,
            "train_s": self.train_s,
            "time_to_target_s": self.time_to_target_s,
            "step_rows": self.step_rows,
            "eval_rows": self.eval_rows,
            "restarts": self.restarts,
            "rank": self.env.rank,
            "world_size": self.env.world_size,
            "nccl_env": seen_env(),  # the interconnect's variables as this worker's NCCL saw them
            "baseline": self.task.baseline() if self.env.rank == 0 else {},
        }

    # ---- one step -------------------------------------------------------------------
    def train_step(self) -> None:
        """Forward, backward (+hook sync), flat sync, clip, optimizer step; one row of timings."""
        epoch, index = divmod(self.step, self.per_epoch)
        device = self.env.device
        wire_before = self.env.wire_counters()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=False)
        loss, samples = self.task.loss(self.model, epoch, index)
        loss.backward()
        wait_device(device)
        t1 = time.perf_counter()
        in_backward = self.applier.take_stats()  # hook mode: work done inside backward
        self.applier.after_backward(self.model)
        wait_device(device)
        t2 = time.perf_counter()
        stats = self.applier.take_stats()
        stats.add(in_backward)
        if self.params.optim.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.optim.clip)
        self.optimizer.step()
        wait_device(device)
        t3 = time.perf_counter()
        wire_after = self.env.wire_counters()
        # Overlapped hooks (PyTorch's own) communicate while backward computes: not subtracted.
        hook_s = in_backward.compress_s + in_backward.decompress_s
        if not self.applier.overlapped:
            hook_s += in_backward.comm_s
        self.train_s += t3 - t0
        self.step += 1
        self.step_rows.append(
            {
                "rank": self.env.rank,
                "step": self.step,
                "epoch": epoch,
                "loss": float(loss.detach()),
                "compute_s": max(t1 - t0 - hook_s, 0.0),
                "compress_s": stats.compress_s,
                "comm_s": stats.comm_s,
                "decompress_s": stats.decompress_s,
                "optim_s": t3 - t2,
                "step_s": t3 - t0,
                "bytes_sent": stats.bytes_sent,
                "bytes_recv": stats.bytes_recv,
                "payload_bytes": stats.payload_bytes,
                "wire_bytes_sent": None if wire_after is None else wire_after[0] - wire_before[0],
                "wire_bytes_recv": None if wire_after is None else wire_after[1] - wire_before[1],
                "samples_per_s": samples / max(t3 - t0, 1e-9),
                "attempt": len(self.restarts),
            }
        )
        if self.env.rank == 0:
            self.env.report({k: v for k, v in self.step_rows[-1].items() if k not in LIVE_SKIP}, self.step)

    # ---- evaluation -------------------------------------------------------------------
    def _average(self) -> tuple[torch.Tensor, float]:
        """The replicas' mean parameters and max_i ||x_i - mean|| / ||mean|| (dense, not counted)."""
        mine = _flat_params(self.module)
        mean = mine.clone()
        if self.env.world_size > 1:
            dist.all_reduce(mean)
            mean /= self.env.world_size
        divergence = torch.tensor([float((mine - mean).norm() / mean.norm().clamp(min=1e-12))], device=mine.device)
        if self.env.world_size > 1:
            dist.all_reduce(divergence, op=dist.ReduceOp.MAX)
        return mean, float(divergence)

    def evaluate(self, splits: tuple[str, ...], max_batches: int | None) -> None:
        """Rank 0 evaluates its own and the averaged model; every rank joins the averaging."""
        mean, divergence = self._average()
        if self.env.rank != 0:
            return
        averaged = copy.deepcopy(self.module)
        torch.nn.utils.vector_to_parameters(mean, averaged.parameters())
        for split in splits:
            for label, model in (("rank0", self.module), ("average", averaged)):
                result = self.task.evaluate(model, split, max_batches)
                self.eval_rows.append(
                    {"step": self.step, "split": split, "model": label, "divergence": divergence,
                     "train_s": self.train_s, **asdict(result)}
                )
                self.env.report({f"{split}.{label}.{k}": v for k, v in asdict(result).items()}, self.step)
                if label == "rank0" and split == "valid" and self.time_to_target_s is None and self._reached(result):
                    self.time_to_target_s = self.train_s
        del averaged

    def _reached(self, result: Any) -> bool:
        p = self.params
        if p.target_ppl is not None and result.ppl is not None:
            return result.ppl <= p.target_ppl
        if p.target_accuracy is not None:
            return result.accuracy >= p.target_accuracy
        return False

    # ---- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the step budget; returns this rank's final state."""
        self.model.train()
        while self.step < self.steps:
            self.train_step()
            if self.step % self.params.eval_every == 0 and self.step < self.steps:
                self.evaluate(("valid",), self.params.eval_batches)
                if self.env.world_size > 1:
                    # The others wait for rank 0's evaluation here, not inside their next step's
                    # collective, where the wait would read as that step's communication time.
                    dist.barrier()
            if self.step % self.params.checkpoint_interval == 0 and self.step < self.steps:
                self.env.save_state(self.state(), {"step": self.step})
        self.evaluate(("valid", "test"), self.params.eval_batches)
        final = self.state()
        final["done"] = True
        self.env.save_state(final, {"step": self.step, "done": 1})
        return final


def run_worker(params: TrainingParams, env: WorkerEnv) -> dict[str, Any]:
    """Build and run one worker's training; returns its final state (rows included)."""
    return TrainingRun(params, env).run()
