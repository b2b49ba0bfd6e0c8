"""Typed parameters of a training trial (the grid's keys, validated by pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from backends.compression import CompressionConfig
from workloads.kind import KindParams
from workloads.training.interconnect import Interconnect


class OptimParams(KindParams):
    """Optimizer: SGD (momentum, weight decay) or Adam; gradient-norm clipping when clip > 0."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=20.0, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    clip: float = Field(default=0.25, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class ModelParams(KindParams):
    """Model sizes: LSTM (embed, hidden, layers, dropout, tied, vocab_size) or CNN (channels, hidden)."""

    embed: int = Field(default=650, ge=1)
    hidden: int = Field(default=650, ge=1)
    layers: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.5, ge=0, lt=1)
    tied: bool = False
    vocab_size: int = Field(default=10_000, ge=3)
    channels: int = Field(default=32, ge=1)


class NetworkParams(KindParams):
    """An emulated network between the workers (backends/network): each worker in its own network
    namespace, its link shaped to this rate, one-way latency and loss."""

    bandwidth_gbit: float | None = Field(default=None, gt=0)
    latency_ms: float = Field(default=0.0, ge=0)
    loss_pct: float = Field(default=0.0, ge=0, lt=100)


class TrainingParams(KindParams):
    """One training trial: workload, compressor, workers, optimizer, budget, evaluation, target."""

    workload: str = "lstm"  # a registered task (workloads/training/tasks.py)
    compressor: CompressionConfig = CompressionConfig()
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    # How NCCL links the GPU workers: its own choice, NVLink peer-to-peer only, or TCP sockets
    # only (workloads/training/interconnect.py); NVLink multicast is always off.
    interconnect: Interconnect = "auto"
    optim: OptimParams = OptimParams()
    model: ModelParams = ModelParams()
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=20, ge=1)  # per worker
    bptt: int = Field(default=35, ge=2)
    eval_every: int = Field(default=200, ge=1)
    eval_batches: int | None = Field(default=None, ge=1)  # cap on validation batches per evaluation
    checkpoint_every: int | None = Field(default=None, ge=1)  # default: eval_every
    target_ppl: float | None = Field(default=None, gt=0)
    target_accuracy: float | None = Field(default=None, gt=0, le=1)
    max_failures: int = Field(default=2, ge=0)  # Ray Train worker-group restarts
    # Where Ray Train keeps checkpoints: an absolute path every node mounts, or a pyarrow
    # filesystem URI (s3://..., gs://..., hdfs://...). None: the trial's folder (one node only).
    storage_path: str | None = None
    # None ("none"): Ray Train workers on the cluster; else worker processes in namespaces on one host.
    network: NetworkParams | None = None
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @field_validator("workload")
    @classmethod
    def _task(cls, value: str) -> str:
        from workloads.training.tasks import TASKS  # tasks.py builds on these params

        if value not in TASKS:
            raise ValueError(TASKS.unknown(value))
        return value

    @field_validator("network", mode="before")
    @classmethod
    def _none(cls, value: object) -> object:
        return None if value == "none" else value

    @model_validator(mode="after")
    def _budget(self) -> TrainingParams:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give at most one of steps or epochs (neither: one epoch)")
        if self.target_ppl is not None and self.target_accuracy is not None:
            raise ValueError("give at most one of target_ppl or target_accuracy (the time to it is time_to_target_s)")
        if self.network is not None and self.use_gpu:
            raise ValueError("network trials run CPU workers (gloo over the emulated links); set use_gpu: false")
        if self.interconnect == "nvlink" and not self.use_gpu:
            raise ValueError("interconnect: nvlink needs use_gpu: true (CPU workers talk over gloo's TCP sockets; "
                             "allowed without a GPU: auto, sockets)")
        if self.interconnect != "auto" and self.network is not None:
            raise ValueError("interconnect applies to Ray Train workers; network trials use their emulated links "
                             "(leave interconnect: auto)")
        if self.storage_path is not None and "://" not in self.storage_path and not self.storage_path.startswith("/"):
            raise ValueError(
                f"storage_path must be an absolute path every node mounts or a URI such as s3://bucket/dir; "
                f"got {self.storage_path!r}"
            )
        from workloads.training.tasks import TASKS

        TASKS[self.workload].check_params(self)
        return self

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints."""
        return self.checkpoint_every or self.eval_every


def worker_resources(params: TrainingParams, resources: dict[str, float]) -> dict[str, float]:
    """One Ray Train worker's resources (grid names): at least one CPU, and one GPU under `use_gpu` unless set."""
    per_worker = {k: float(v) for k, v in resources.items() if v}
    if params.use_gpu:
        per_worker.setdefault("num_gpus", 1.0)
    else:
        per_worker.pop("num_gpus", None)
    per_worker.setdefault("num_cpus", 1.0)
    return per_worker
