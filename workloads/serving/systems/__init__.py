"""The systems under test of serving trials, registered by backend name (see ``registry.py``)."""

from workloads.serving.systems.registry import (
    SYSTEMS,
    ReportsMemory,
    SystemUnderTest,
    open_system,
    vocab_size_of,
)

__all__ = ["SYSTEMS", "ReportsMemory", "SystemUnderTest", "open_system", "vocab_size_of"]
