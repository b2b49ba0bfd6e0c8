"""What emulated delay costs in throughput: goodput of one TCP transfer between two emulated hosts,
with and without latency, against the configured rate; and the measured one-way latency.

For each rate (Gb/s; ``none`` = unshaped veth) and one-way latency (ms), two hosts on an
``EmulatedNetwork``: a timed TCP transfer sized to take ~``--seconds`` at the rate (goodput over
the transfer less the two one-way trips the timer spans; TCP slow start included), and the
median of 50 ICMP echo round trips / 2. ``ratio`` = goodput with this latency / goodput
without latency at the same rate, measured in the same run. Also the CPU seconds the delay lines
used (netfilter mode; 0 with netem). Needs root:

    .venv/bin/python -m benchmarks.bench_network [--rates 0.1 1 10 none] [--latencies 0 1 5] [--seconds 2] [--loss 0]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

from backends.network import EmulatedNetwork, LinkShape, kernel_has_netem

PROBE = str(Path(__file__).resolve().parents[1] / "backends" / "network" / "probe.py")
UNSHAPED_BYTES_PER_S = 0.6e9  # sizes the unshaped transfer (a veth on the development machine)


def _start(host, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*host.exec_args(), sys.executable, PROBE, *args], text=True, stdout=subprocess.PIPE)


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


def _cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


def measure(rate_gbit: float | None, latency_ms: float, seconds: float, loss_pct: float = 0.0) -> dict[str, float]:
    """Goodput (bit/s), one-way latency (ms) and delay-line CPU seconds on one emulated link."""
    nbytes = int((rate_gbit * 1e9 / 8 if rate_gbit else UNSHAPED_BYTES_PER_S) * seconds)
    with EmulatedNetwork(2, LinkShape(bandwidth_gbit=rate_gbit, latency_ms=latency_ms, loss_pct=loss_pct)) as net:
        a, b = net.hosts
        rtt = float(_start(a, "icmp_ping", b.address, "50").communicate(timeout=60)[0])
        sink = _start(b, "sink", "5001")
        _ready(sink)
        elapsed = float(_start(a, "send", b.address, "5001", str(nbytes)).communicate(timeout=300)[0])
        sink.wait(timeout=10)
        cpu = _cpu_s(net.delay_line_pids)
    return {"goodput": nbytes * 8 / (elapsed - 2 * latency_ms / 1000), "latency_ms": rtt / 2 * 1000, "cpu_s": cpu}


def main() -> None:
    """Print a markdown table of goodput and latency per rate and latency."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["0.1", "1", "10", "none"])
    parser.add_argument("--latencies", nargs="+", type=float, default=[0.0, 1.0, 5.0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--loss", type=float, default=0.0, help="loss_pct on every link (default 0)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: bench_network needs root (network namespaces, veths, tc, iptables)")
    mechanism = "netem" if kernel_has_netem() else "netfilter + delay line"
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, delay by {mechanism}, loss {args.loss:g} %, load {os.getloadavg()[0]:.1f}")
    print("| rate Gb/s | latency ms | measured one-way ms | goodput Mb/s | goodput / rate | ratio to 0 ms | "
          "delay-line CPU s |")
    print("|---|---|---|---|---|---|---|")
    for rate_text in args.rates:
        rate = None if rate_text == "none" else float(rate_text)
        baseline = None
        for latency in args.latencies:
            row = measure(rate, latency, args.seconds, args.loss)
            baseline = baseline or row["goodput"]
            share = f"{row['goodput'] / (rate * 1e9):.3f}" if rate else "-"
            print(f"| {rate_text} | {latency:g} | {row['latency_ms']:.2f} | {row['goodput'] / 1e6:,.0f} | {share} | "
                  f"{row['goodput'] / baseline:.3f} | {row['cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
