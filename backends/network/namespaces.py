"""Hosts made of network namespaces on one machine, joined by veth pairs on a bridge.

``EmulatedNetwork(hosts, shape)`` creates, per host, a namespace ``orchnet-<token>-<host>``
holding ``eth0`` (one end of a veth pair; the other end is on the bridge ``onb<token>``) with
an address from ``subnet``, and shapes each host's link (``shaping.py``). ``<token>`` is
unique per network, so trials and test clusters side by side never share a name.

Teardown is guaranteed three ways:
- ``close()`` / leaving the ``with`` block: the processes left in the namespaces are killed,
  the veth pairs (and with them their qdiscs), the namespaces and the bridge are deleted;
- a guard process in its own session holds a pipe from the owner; when the owner dies without
  closing (SIGKILL, a killed trial actor) the pipe reaches end-of-file and the guard tears down;
- ``sweep_stale()`` (run by every new network) removes networks whose owner process is gone,
  named by the owner recorded in the bridge's alias.

Delay and loss use the kernel's netem qdisc where it exists and otherwise netfilter plus a
delay-line process in each host's namespace (``shaping.py``, ``delayline.py``);
``kernel_has_netem()`` is the one place that decides, once per process.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2's ``ip`` and ``tc``, and for delay or
loss without netem, ``iptables``.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backends.network.shaping import DELAY_QUEUE, HOST_INTERFACE, LinkShape
from backends.procs import start_ticks

NETNS_DIR = Path("/run/netns")
SYS_CLASS_NET = Path("/sys/class/net")
NAMESPACE_PREFIX = "orchnet-"
BRIDGE_PREFIX = "onb"
GUARD_DONE = b"done\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


class NetworkError(RuntimeError):
    """An emulated network cannot be built here (one line: what is missing)."""


@dataclass(frozen=True)
class Host:
    """One emulated host: its namespace, address on the bridge and interface name inside."""

    name: str
    namespace: str
    address: str
    interface: str = HOST_INTERFACE

    def exec_args(self) -> list[str]:
        """Prefix that runs a command inside this host (``ip netns exec``; /sys shows its interfaces)."""
        return ["ip", "netns", "exec", self.namespace]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"`{' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _add_qdisc(command: list[str]) -> None:
    result = _run(*command, check=False)
    if result.returncode != 0:
        raise NetworkError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")


@contextlib.contextmanager
def _probe_namespace() -> Iterator[str]:
    """A throwaway namespace (loopback up) to try qdiscs and rules in."""
    probe = f"{NAMESPACE_PREFIX}probe{os.getpid()}"
    _run("ip", "netns", "add", probe)
    try:
        _run("ip", "-n", probe, "link", "set", "lo", "up")
        yield probe
    finally:
        _run("ip", "netns", "del", probe, check=False)


@functools.cache
def kernel_has_netem() -> bool:
    """Whether this kernel has the netem qdisc (probed once per process, in a throwaway namespace)."""
    require_privileges()
    with _probe_namespace() as probe:
        return _run("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                    check=False).returncode == 0


def require_privileges() -> None:
    """NetworkError unless this process can build namespaces, veths and qdiscs."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetworkError(f"emulated networks need iproute2 ({', '.join(missing)} not found; apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetworkError(
            "emulated networks (network: ...) need root to create network namespaces, veth pairs and tc "
            "qdiscs; run as root, or use network: none"
        )


def _uses_netfilter(shape: LinkShape) -> bool:
    return shape.impaired and not kernel_has_netem()


def check_support(shape: LinkShape) -> None:
    """NetworkError unless networks of this shape can be built here (privileges, tools, qdiscs, rules)."""
    require_privileges()
    netfilter = _uses_netfilter(shape)
    if netfilter and shutil.which("iptables") is None:
        raise NetworkError(
            "this kernel has no netem qdisc, so latency_ms and loss_pct are emulated with netfilter, which "
            "needs iptables (apt-get install iptables)"
        )
    egress = shape.egress(netem=not netfilter)
    if not egress and not netfilter:
        return
    with _probe_namespace() as probe:
        for args in egress:
            _add_qdisc(["tc", "-n", probe, "qdisc", "add", "dev", "lo", *args])
        for rule in shape.netfilter_rules() if netfilter else []:
            _run("ip", "netns", "exec", probe, "iptables", *rule)


def _owner_alive(owner: str) -> bool:
    pid, _, ticks = owner.partition(":")
    return pid.isdigit() and ticks.isdigit() and start_ticks(int(pid)) == int(ticks)


def _namespaces(token: str) -> list[str]:
    prefix = f"{NAMESPACE_PREFIX}{token}-"
    return sorted(p.name for p in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.exists() else []


def teardown(token: str) -> None:
    """Remove everything of network ``token``: its processes, veths (and qdiscs), namespaces, bridge."""
    namespaces = _namespaces(token)
    pids: list[int] = []
    for ns in namespaces:
        listed = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        pids += [int(p) for p in listed if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for link in SYS_CLASS_NET.glob(f"onv{token}*"):  # one end deletes the pair, wherever the other is
        _run("ip", "link", "del", link.name, check=False)
    for ns in namespaces:
        for link in _run("ip", "-n", ns, "-o", "link", "show", "type", "veth", check=False).stdout.splitlines():
            name = link.split(":")[1].strip().split("@")[0]
            _run("ip", "-n", ns, "link", "del", name, check=False)
        _run("ip", "netns", "del", ns, check=False)
    _run("ip", "link", "del", f"{BRIDGE_PREFIX}{token}", check=False)


def sweep_stale() -> list[str]:
    """Tear down the networks whose owner process is gone; returns their tokens."""
    tokens = set()
    for bridge in SYS_CLASS_NET.glob(f"{BRIDGE_PREFIX}*"):
        try:
            alias = (bridge / "ifalias").read_text().strip()
        except OSError:
            continue
        if alias.startswith("orchnet owner=") and not _owner_alive(alias.split("=", 1)[1]):
            tokens.add(bridge.name[len(BRIDGE_PREFIX):])
    if NETNS_DIR.exists():  # namespaces whose bridge is gone (a setup that died half-way)
        for ns in NETNS_DIR.glob(f"{NAMESPACE_PREFIX}*"):
            token = ns.name[len(NAMESPACE_PREFIX):].split("-", 1)[0]
            if not (SYS_CLASS_NET / f"{BRIDGE_PREFIX}{token}").exists():
                tokens.add(token)
    for token in sorted(tokens):
        teardown(token)
    return sorted(tokens)


def guard_main() -> None:
    """The guard process: wait for the owner's pipe; tear down unless the owner said it is done."""
    token = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.stdin.buffer.read() != GUARD_DONE:
        teardown(token)


class EmulatedNetwork:
    """Hosts in namespaces on one bridge, links shaped; a context manager that always tears down."""

    def __init__(
        self,
        hosts: int | list[str],
        shape: LinkShape | None = None,
        subnet: str = "10.213.0.0/24",
        gateway: bool = False,
    ) -> None:
        names = [str(i) for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"hosts must be distinct names (or a count >= 1); got {hosts!r}")
        self.names = names
        self.shape = shape or LinkShape()
        self.subnet = ipaddress.ip_network(subnet)
        if len(names) + 2 > self.subnet.num_addresses - 2:
            raise ValueError(f"subnet {subnet} is too small for {len(names)} hosts")
        self.gateway = gateway  # give the bridge the subnet's last address: the machine reaches the hosts
        self.token = uuid.uuid4().hex[:6]
        self.bridge = f"{BRIDGE_PREFIX}{self.token}"
        self.hosts: list[Host] = []
        self._guard: subprocess.Popen[bytes] | None = None
        self._delay_lines: list[subprocess.Popen[str]] = []

    @property
    def gateway_address(self) -> str | None:
        """The bridge's address in the machine's own namespace, when ``gateway``."""
        return str(self.subnet[-2]) if self.gateway else None

    def __enter__(self) -> EmulatedNetwork:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> list[Host]:
        """Build the bridge, namespaces, veths, addresses and shaping; returns the hosts."""
        require_privileges()
        sweep_stale()
        self._start_guard()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self.hosts

    @staticmethod
    def _env() -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))

    def _start_guard(self) -> None:
        self._guard = subprocess.Popen(
            [sys.executable, "-c", "from backends.network.namespaces import guard_main; guard_main()", self.token],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=self._env(),
        )

    @staticmethod
    def _raise_tcp_buffers(host: Host, buffer: int) -> None:
        """Let TCP's windows in ``host`` grow to ``buffer`` bytes (never lowers a larger maximum)."""
        for key in ("net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem"):
            low, default, high = _run(*host.exec_args(), "sysctl", "-n", key).stdout.split()
            _run(*host.exec_args(), "sysctl", "-q", "-w", f"{key}={low} {default} {max(int(high), buffer)}")

    def _impair_with_netfilter(self, host: Host) -> None:
        """Loss and delay for packets arriving at ``host``: iptables rules and, for delay, its delay line."""
        for rule in self.shape.netfilter_rules():
            _run(*host.exec_args(), "iptables", *rule)
        if self.shape.latency_ms <= 0:
            return
        line = subprocess.Popen(
            [*host.exec_args(), sys.executable, "-m", "backends.network.delayline", str(DELAY_QUEUE),
             f"{self.shape.latency_ms:g}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._env(), cwd=REPO_ROOT,
        )
        self._delay_lines.append(line)
        assert line.stdout is not None and line.stderr is not None
        if line.stdout.readline().strip() != "ready":
            line.wait()
            raise NetworkError(f"the delay line in {host.namespace} did not start: {line.stderr.read().strip()}")

    def _build(self) -> None:
        owner = f"{os.getpid()}:{start_ticks(os.getpid())}"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", "dev", self.bridge, "alias", f"orchnet owner={owner}")
        _run("ip", "link", "set", self.bridge, "up")
        if self.gateway_address:
            _run("ip", "addr", "add", f"{self.gateway_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        for index, name in enumerate(self.names):
            host = Host(name=name, namespace=f"{NAMESPACE_PREFIX}{self.token}-{name}",
                        address=str(self.subnet[index + 1]))
            outer, inner = f"onv{self.token}{index}", f"onh{self.token}{index}"
            _run("ip", "netns", "add", host.namespace)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", host.namespace)
            _run("ip", "link", "set", outer, "master", self.bridge, "up")
            _run("ip", "-n", host.namespace, "link", "set", inner, "name", host.interface)
            _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/{self.subnet.prefixlen}",
                 "dev", host.interface)
            _run("ip", "-n", host.namespace, "link", "set", host.interface, "up")
            _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
            if (buffer := self.shape.tcp_buffer_bytes()) is not None:
                self._raise_tcp_buffers(host, buffer)
            netfilter = _uses_netfilter(self.shape)
            for args in self.shape.egress(netem=not netfilter):
                _add_qdisc(["tc", "-n", host.namespace, "qdisc", "add", "dev", host.interface, *args])
            for args in self.shape.ingress():
                _add_qdisc(["tc", "qdisc", "add", "dev", outer, *args])
            if netfilter:
                self._impair_with_netfilter(host)
            self.hosts.append(host)

    @property
    def delay_line_pids(self) -> list[int]:
        """Process ids of the hosts' delay lines (netfilter mode; empty with netem or no latency)."""
        return [line.pid for line in self._delay_lines]

    def check_links(self) -> None:
        """NetworkError if a host's delay line has exited: that host's traffic would stop for good."""
        for host, line in zip(self.hosts, self._delay_lines, strict=False):
            if line.poll() is not None:
                detail = line.stderr.read().strip().splitlines() if line.stderr else []
                raise NetworkError(f"the delay line of {host.namespace} exited ({line.returncode}): "
                                   f"{detail[-1] if detail else 'no message'}")

    def close(self) -> None:
        """Tear everything down (idempotent) and dismiss the guard."""
        teardown(self.token)  # kills the delay lines too: they run in the namespaces
        for line in self._delay_lines:
            line.kill()
            line.wait()
        self._delay_lines = []
        if self._guard is not None:
            try:
                assert self._guard.stdin is not None
                self._guard.stdin.write(GUARD_DONE)
                self._guard.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            self._guard.wait(timeout=10)
            self._guard = None

    def wait_gone(self, timeout_s: float = 10.0) -> bool:
        """True once nothing of this network remains (namespaces, veths, bridge)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not leftovers(self.token):
                return True
            time.sleep(0.05)
        return False


def leftovers(token: str) -> list[str]:
    """What of network ``token`` still exists: namespaces, links (veths, bridge)."""
    links = [p.name for p in SYS_CLASS_NET.iterdir() if p.name.startswith((f"onv{token}", f"onh{token}", f"{BRIDGE_PREFIX}{token}"))]
    return _namespaces(token) + links
