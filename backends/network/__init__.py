"""Emulated networks on one host: network namespaces joined by veth pairs on a bridge, each
host's link shaped with tc. Used by training trials (``network:``) and multi-host test clusters.

Public API: ``LinkShape``, ``Host``, ``EmulatedNetwork`` (context manager), ``sweep_stale``,
``interface_counters``, ``check_support``, ``kernel_has_netem``, ``NetworkError``.
"""

from backends.network.counters import interface_counters
from backends.network.namespaces import (
    EmulatedNetwork,
    Host,
    NetworkError,
    check_support,
    kernel_has_netem,
    sweep_stale,
)
from backends.network.shaping import LinkShape

__all__ = [
    "EmulatedNetwork", "Host", "LinkShape", "NetworkError", "check_support", "interface_counters", "kernel_has_netem",
    "sweep_stale",
]
