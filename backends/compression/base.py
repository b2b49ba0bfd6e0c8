"""The Compressor contract (GRACE's split) and the configuration every compressor reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

Collective = Literal["allreduce", "allgather"]
Mode = Literal["hook", "flat"]
Payload = list[torch.Tensor]


@dataclass(frozen=True)
class CompressionConfig:
    """Typed knobs of every compressor; each compressor reads the ones it needs."""

    name: str = "dense"
    ratio: float = 0.01  # topk: fraction of elements kept
    levels: int = 127  # qsgd: s quantisation levels (127 -> one signed byte per element)
    bucket_size: int = 128  # qsgd: elements sharing one fp32 norm
    rank: int = 1  # powersgd: matrix approximation rank
    start_iter: int = 10  # powersgd: plain all-reduce before this iteration
    residual: Literal["global", "local"] = "global"  # a2sgd: residual against global or local means
    threshold: Literal["zero", "mean"] = "zero"  # a2sgd: split v at 0 or at mean(v)
    error_feedback: bool | None = None  # None: the compressor's default
    mode: Mode | None = None  # None: the compressor's default
    seed: int = 0


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
    # Compressors that bring their own DDP hook (PowerSGD) set this and implement make_ddp_hook.
    native_hook: ClassVar[bool] = False

    def __init__(self, config: CompressionConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank

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


COMPRESSORS: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a compressor available by its ``name``."""
    COMPRESSORS[cls.name] = cls
    return cls


def build_compressor(config: CompressionConfig, rank: int = 0) -> Compressor:
    """Instantiate the compressor ``config.name``; ValueError names the allowed ones."""
    try:
        cls = COMPRESSORS[config.name]
    except KeyError:
        raise ValueError(f"unknown compressor {config.name!r}; allowed: {sorted(COMPRESSORS)}") from None
    return cls(config, rank)


def error_feedback_enabled(compressor: Compressor) -> bool:
    """The config's error_feedback, or the compressor's default when unset."""
    ef = compressor.config.error_feedback
    return compressor.default_error_feedback if ef is None else ef


def mode_of(compressor: Compressor) -> Mode:
    """The config's application mode, or the compressor's default when unset."""
    return compressor.config.mode or compressor.default_mode
