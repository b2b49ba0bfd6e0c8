"""Systems under test by backend name: the registry the serving kind builds its system from.

A backend is added by writing one module with a factory ``open_system(params) -> SystemUnderTest``
and one line here; the kind and the orchestrator do not change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from workloads.serving.transport import Transport

if TYPE_CHECKING:
    from workloads.serving.params import ServingParams

_ENGINE = "workloads.serving.engine_system:open_engine_system"

# Backend name -> "module:factory". Our engine's cache policies run in process; vLLM is the real vLLM.
SYSTEMS: dict[str, str] = {
    "full": _ENGINE,
    "h2o": _ENGINE,
    "infinigen": _ENGINE,
    "offload": _ENGINE,
    "streaming": _ENGINE,
    "vllm": "workloads.serving.vllm_system:open_vllm_system",
}


class SystemUnderTest(Protocol):
    """A running system that a load can be sent to."""

    name: str
    default_transport: str  # the transport `transport: auto` means for this system

    def transport(self, kind: str) -> Transport:
        """The transport of that kind ("inprocess" | "http"); ValueError if unsupported."""
        ...

    def tokenizer(self) -> Any | None:
        """The system's tokenizer (real weights), else None."""
        ...

    def close(self) -> None:
        """Stop servers / free the engine; idempotent."""
        ...


@runtime_checkable
class ReportsMemory(Protocol):
    """Optional: a system that can report its own memory peaks (our engine does)."""

    def reset_peaks(self) -> None:
        """Start a new peak-measurement window."""
        ...

    def memory_peaks(self) -> dict[str, int]:
        """``peak_kv_bytes`` and ``peak_device_bytes`` since the last ``reset_peaks``."""
        ...


def open_system(params: ServingParams) -> SystemUnderTest:
    """Build the system named by ``params.backend.name``."""
    name = params.backend.name
    try:
        target = SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(sorted(SYSTEMS))}") from None
    module_name, _, factory = target.partition(":")
    return getattr(importlib.import_module(module_name), factory)(params)


def vocab_size_of(system: SystemUnderTest) -> int:
    """Vocabulary size for synthetic prompts: the system's own, else its tokenizer's."""
    size = getattr(system, "vocab_size", None)
    if size:
        return int(size)
    tokenizer = system.tokenizer()
    if tokenizer is not None:
        return len(tokenizer)
    raise ValueError(f"system {system.name!r} reports no vocabulary size and has no tokenizer")
