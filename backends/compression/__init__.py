"""Gradient compression (GRACE's split): Compressor, Memory (error feedback), Communicator.

Public API:
- ``CompressionConfig``: typed knobs (the grid's ``compressor`` section); ``COMPRESSORS``: name -> class
  (a ``backends.registry.Registry``: every module of this package is imported on its first read, so
  a compressor is one module with ``@COMPRESSORS.register``).
- ``build_compressor(config, rank)``; ``ddp_options(config, backend)``: what DDP needs for it; ``build_applier(config, model, group)`` -> ``GradientApplier``
  (``after_backward(model)``, ``take_stats()``, ``state_dict()`` / ``load_state_dict()``).
- ``GradientSync``: compensate -> compress -> collective -> decompress -> residual, for one tensor.
- ``Communicator`` and the byte model ``ring_allreduce_bytes`` / ``allgather_bytes``.
"""

from backends.compression.apply import (
    FlatApplier,
    GradientApplier,
    HookApplier,
    NativeHookApplier,
    build_applier,
)
from backends.compression.base import (
    COMPRESSORS,
    CompressContext,
    CompressionConfig,
    Compressor,
    build_compressor,
    ddp_options,
    error_feedback_enabled,
    mode_of,
)
from backends.compression.communicator import (
    ByteCount,
    Communicator,
    allgather_bytes,
    ring_allreduce_bytes,
    tensor_bytes,
)
from backends.compression.memory import Memory, ResidualMemory
from backends.compression.sync import GradientSync, SyncStats

__all__ = [
    "COMPRESSORS",
    "ByteCount",
    "CompressContext",
    "CompressionConfig",
    "Communicator",
    "Compressor",
    "FlatApplier",
    "GradientApplier",
    "GradientSync",
    "HookApplier",
    "Memory",
    "NativeHookApplier",
    "ResidualMemory",
    "SyncStats",
    "allgather_bytes",
    "build_applier",
    "build_compressor",
    "ddp_options",
    "error_feedback_enabled",
    "mode_of",
    "ring_allreduce_bytes",
    "tensor_bytes",
]
