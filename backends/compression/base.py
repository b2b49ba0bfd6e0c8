"""The Compressor contract (GRACE's split) and the configuration every compressor reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.registry import Registry, import_submodules

Collective = Literal["allreduce", "allgather"]
Mode = Literal["hook", "flat"]
Payload = list[torch.Tensor]


class CompressionConfig(BaseModel):
    """Typed knobs of every compressor, declared once: the grid's ``compressor`` section is this
    model. Each compressor reads the knobs it needs; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "dense"
    ratio: float = Field(default=0.01, gt=0, le=1)  # topk: fraction of elements kept
    levels: int = Field(default=127, ge=1, le=32767)  # qsgd: s levels (127 -> one signed byte per element)
    bucket_size: int = Field(default=128, ge=1)  # qsgd: elements sharing one fp32 norm
    rank: int = Field(default=1, ge=1)  # powersgd: matrix approximation rank
    start_iter: int = Field(default=10, ge=2)  # powersgd: plain all-reduce before this iteration
    residual: Literal["global", "local"] = "global"  # a2sgd: residual against global or local means
    threshold: Literal["zero", "mean"] = "zero"  # a2sgd: split v at 0 or at mean(v)
    error_feedback: bool | None = None  # None: the compressor's default
    mode: Mode | None = None  # None: the compressor's default

    @model_validator(mode="after")
    def _known(self) -> CompressionConfig:
        cls = COMPRESSORS.get_or_raise(self.name)
        if self.mode == "flat" and cls.hook_only:
            raise ValueError(f"{self.name} runs only as a DDP hook (mode: hook)")
        return self


@dataclass
class CompressContext:
    """What decompress needs to rebuild a tensor: its shape and dtype, plus compressor extras."""

    shape: torch.Size
    dtype: torch.dtype
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)


class Compressor(ABC):
    """compress(tensor) -> payload tensors; decompress(payload) -> tensor; one declared collective.

    ``allreduce`` compressors: the collective sums the payloads of ``ctx.world_size`` workers and
    decompress turns that sum into the average (with world_size = 1 it decodes one payload).
    ``allgather`` compressors: decompress decodes one worker's payload; ``GradientSync``
    averages the decoded tensors.
    """

    name: ClassVar[str]
    collective: ClassVar[Collective]
    default_error_feedback: ClassVar[bool] = False
    default_mode: ClassVar[Mode] = "hook"
    # Error feedback keeps e = v - reference, where reference is this worker's own
    # decompressed payload ("local", GRACE's rule) or the averaged global result ("global").
    residual_reference: Literal["local", "global"] = "local"
    # Compressors whose hook mode is PyTorch's own DDP hook (dense, fp16, PowerSGD) set this and
    # implement make_ddp_hook(communicator, parameters) -> (state, hook), counting bytes in the
    # communicator; ``parameters`` (layout.ParameterPositions) names a bucket's parameters.
    native_hook: ClassVar[bool] = False
    # Compressors that exist only as a DDP hook (PowerSGD: collectives between compression steps).
    hook_only: ClassVar[bool] = False
    # Backends on which DDP must give this hook the whole gradient as one bucket. PyTorch's
    # PowerSGD hook issues its later all-reduces from future callbacks, which gloo runs on its own
    # threads: with two buckets the ranks issue them in different orders (a collective mismatch,
    # or a hang).
    one_bucket_backends: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CompressionConfig, rank: int = 0, seed: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.seed = seed  # the trial's seed, for compressors that draw random numbers

    @abstractmethod
    def compress(self, tensor: torch.Tensor, ctx: CompressContext) -> Payload:
        """Encode a flat tensor into payload tensors (may add to ctx.extra for decompress)."""

    @abstractmethod
    def decompress(self, payload: Payload, ctx: CompressContext) -> torch.Tensor:
        """Rebuild a flat tensor from (possibly summed) payload tensors."""

    def state_dict(self) -> dict[str, Any]:
        """Compressor-owned state to checkpoint (RNG streams, hook state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned (stateless compressors have nothing to restore)."""
        del state


COMPRESSORS: Registry[type[Compressor]] = Registry(
    "compressor", loader=lambda: import_submodules("backends.compression")
)


def build_compressor(config: CompressionConfig, rank: int = 0, seed: int = 0) -> Compressor:
    """Instantiate the compressor ``config.name`` for worker ``rank`` (random streams from ``seed``)."""
    return COMPRESSORS.get_or_raise(config.name)(config, rank, seed)


def error_feedback_enabled(compressor: Compressor) -> bool:
    """The config's error_feedback, or the compressor's default when unset."""
    ef = compressor.config.error_feedback
    return compressor.default_error_feedback if ef is None else ef


def mode_of(config: CompressionConfig) -> Mode:
    """The config's application mode, or its compressor's default when unset."""
    return config.mode or COMPRESSORS.get_or_raise(config.name).default_mode


# DDP's bucket cap (MiB) that holds any model in one bucket (the first bucket too, as it is set).
ONE_BUCKET_MB = 1 << 30


def ddp_options(config: CompressionConfig, backend: str) -> dict[str, Any]:
    """Keyword arguments for DDP that ``config``'s compressor needs on ``backend`` (hook mode)."""
    if backend in COMPRESSORS.get_or_raise(config.name).one_bucket_backends:
        return {"bucket_cap_mb": ONE_BUCKET_MB}
    return {}
