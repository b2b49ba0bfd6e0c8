"""Bytes on the wire, from the kernel's interface counters."""

from __future__ import annotations

from pathlib import Path

SYS_CLASS_NET = Path("/sys/class/net")


def interface_counters(interface: str) -> tuple[int, int]:
    """(tx_bytes, rx_bytes) of ``interface`` as this process's /sys shows it (inside a namespace
    entered with ``ip netns exec``, that namespace's interfaces): Ethernet frames with their
    IP and TCP headers, ACKs and retransmissions included."""
    stats = SYS_CLASS_NET / interface / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())
