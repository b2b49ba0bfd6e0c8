"""Systems under test by backend name: the registry the serving kind builds its system from.

A backend is added by writing one module in this package whose factory
``open_...(params) -> SystemUnderTest`` is decorated with ``@SYSTEMS.register(name=...)``;
the kind and the orchestrator do not change. Our engine registers one backend per registered
cache policy (``engine.py``); the real vLLM registers ``vllm`` (``vllm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from backends.registry import Registry, import_submodules
from workloads.serving.transports.base import Transport

if TYPE_CHECKING:
    from workloads.serving.params import ServingParams


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

    def block_size(self) -> int | None:
        """Tokens per KV block the running engine uses (its default when the grid set none)."""
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


SystemFactory = Callable[["ServingParams"], SystemUnderTest]

# Backend name -> factory; the modules of this package register themselves on the first read.
SYSTEMS: Registry[SystemFactory] = Registry(
    "backend", loader=lambda: import_submodules("workloads.serving.systems")
)


def open_system(params: ServingParams) -> SystemUnderTest:
    """Build the system named by ``params.backend.name``."""
    return SYSTEMS.get_or_raise(params.backend.name)(params)


def vocab_size_of(system: SystemUnderTest) -> int:
    """Vocabulary size for synthetic prompts: the system's own, else its tokenizer's."""
    size = getattr(system, "vocab_size", None)
    if size:
        return int(size)
    tokenizer = system.tokenizer()
    if tokenizer is not None:
        return len(tokenizer)
    raise ValueError(f"system {system.name!r} reports no vocabulary size and has no tokenizer")
