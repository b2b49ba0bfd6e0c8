"""How one host's link is shaped: tbf for the rate; netem, or netfilter, for delay and loss.

Rate: the host's traffic leaves through its namespace-side veth and arrives through the
bridge-side veth, each with a tbf qdisc, so each host has a full-duplex link of
``bandwidth_gbit`` in each direction, as a NIC on a switch has.

Delay and loss, one of two ways (``namespaces.py`` picks once per process, by probing the
kernel): where the kernel has the netem qdisc, netem on the host's egress (tbf under it);
where it has not, netfilter in the host's namespace: on every packet arriving at ``eth0``, an
iptables ``statistic`` match drops ``loss_pct`` percent, and an ``NFQUEUE`` rule hands the rest
to a delay line (``delayline.py``) that releases each packet ``latency_ms`` after it arrived.
Either way a packet between two hosts is delayed (and may be lost) exactly once: ``latency_ms``
is the one-way latency, the round trip is twice it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MTU_BYTES = 1500
UNSHAPED_BYTES_PER_S = 1.25e9  # an unshaped link is sized as 10 Gb/s (queues, buffers)
DEFAULT_TCP_BUFFER_BYTES = 4 << 20  # the kernel's default tcp_wmem maximum
HOST_INTERFACE = "eth0"  # a host's interface inside its namespace
DELAY_QUEUE = 0  # the netfilter queue a host's delay line serves (one per namespace)
TBF_QUEUE_S = 0.1  # tbf holds up to 100 ms of traffic at the rate before dropping


@dataclass(frozen=True)
class LinkShape:
    """A link: rate (None: unshaped), one-way latency and random loss."""

    bandwidth_gbit: float | None = None
    latency_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_gbit is not None and self.bandwidth_gbit <= 0:
            raise ValueError(f"bandwidth_gbit must be > 0, got {self.bandwidth_gbit}")
        if self.latency_ms < 0 or not 0 <= self.loss_pct < 100:
            raise ValueError(f"need latency_ms >= 0 and 0 <= loss_pct < 100; got {self.latency_ms}, {self.loss_pct}")

    @property
    def rate_bytes_per_s(self) -> float | None:
        """The rate in bytes per second."""
        return None if self.bandwidth_gbit is None else self.bandwidth_gbit * 1e9 / 8

    def _tbf(self) -> list[str]:
        rate = self.rate_bytes_per_s
        assert rate is not None
        # Burst: at least one GSO super-packet (64 KiB) and 4 ms at the rate (timer granularity).
        burst = max(64 * 1024 + MTU_BYTES, math.ceil(rate * 0.004))
        limit = max(burst * 2, math.ceil(rate * TBF_QUEUE_S))
        return ["tbf", "rate", f"{round(rate * 8)}bit", "burst", str(burst), "limit", str(limit)]

    @property
    def impaired(self) -> bool:
        """True when the link delays or loses packets (not only limits the rate)."""
        return self.latency_ms > 0 or self.loss_pct > 0

    def egress(self, netem: bool = True) -> list[list[str]]:
        """tc arguments (after ``tc qdisc add dev IF``) for the host side: netem (when ``netem`` and
        the link is impaired), then tbf under it."""
        commands: list[list[str]] = []
        if netem and self.impaired:
            rate = self.rate_bytes_per_s or UNSHAPED_BYTES_PER_S
            packets = max(1000, math.ceil(2 * rate * self.latency_ms / 1000 / MTU_BYTES))
            netem = ["root", "handle", "1:", "netem", "limit", str(packets)]
            if self.latency_ms > 0:
                netem += ["delay", f"{self.latency_ms:g}ms"]
            if self.loss_pct > 0:
                netem += ["loss", f"{self.loss_pct:g}%"]
            commands.append(netem)
            if self.bandwidth_gbit is not None:
                commands.append(["parent", "1:1", "handle", "10:", *self._tbf()])
        elif self.bandwidth_gbit is not None:
            commands.append(["root", "handle", "1:", *self._tbf()])
        return commands

    def ingress(self) -> list[list[str]]:
        """tc arguments for the bridge side (traffic towards the host): the rate only."""
        return [] if self.bandwidth_gbit is None else [["root", "handle", "1:", *self._tbf()]]

    def tcp_buffer_bytes(self) -> int | None:
        """The hosts' largest TCP send/receive buffer, when the kernel's default (4 MiB) is below
        twice the round trip's bandwidth-delay product: a host tuned for its link, so that TCP's
        window, not the emulation, never caps a long fat link's throughput."""
        rate = self.rate_bytes_per_s or UNSHAPED_BYTES_PER_S
        needed = math.ceil(2 * rate * 2 * self.latency_ms / 1000)
        return needed if needed > DEFAULT_TCP_BUFFER_BYTES else None

    def netfilter_rules(self) -> list[list[str]]:
        """iptables arguments (after ``iptables``) that impair packets arriving at the host, when
        the kernel has no netem: random loss, then the delay line's queue."""
        rules: list[list[str]] = []
        arriving = ["-t", "raw", "-A", "PREROUTING", "-i", HOST_INTERFACE]
        if self.loss_pct > 0:
            rules.append([*arriving, "-m", "statistic", "--mode", "random",
                          "--probability", f"{self.loss_pct / 100:.6f}", "-j", "DROP"])
        if self.latency_ms > 0:
            rules.append([*arriving, "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE)])
        return rules
