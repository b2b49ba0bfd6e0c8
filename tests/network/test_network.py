"""Emulated networks: shaped links measured, teardown after a kill, a clear error without root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.network import EmulatedNetwork, LinkShape, NetworkError, check_support
from backends.network import namespaces as ns_module
from backends.network.namespaces import kernel_has_netem, leftovers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROBE = str(ROOT / "backends" / "network" / "probe.py")  # measurement programs run inside hosts
RATE_GBIT = 0.1  # 100 Mbit/s: a transfer of a few MB takes a fraction of a second

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _in(host, *args: str, **popen) -> subprocess.Popen[str]:
    return subprocess.Popen([*host.exec_args(), sys.executable, *args], text=True, stdout=subprocess.PIPE, **popen)


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


def _tx_bytes(host) -> int:
    """Bytes the host's interface has sent (its namespace's /sys counters)."""
    out = subprocess.run([*host.exec_args(), "cat", f"/sys/class/net/{host.interface}/statistics/tx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


# Each case runs with whatever emulates delay here: netem where the kernel has it, else netfilter
# and the delay line (this development kernel and CI's).
@pytest.mark.parametrize("latency_ms", [0.0, 5.0])
def test_a_timed_transfer_finds_the_configured_bandwidth(latency_ms: float) -> None:
    nbytes = 12_000_000
    rates = []  # (wire, goodput) bit/s per transfer
    with EmulatedNetwork(2, LinkShape(bandwidth_gbit=RATE_GBIT, latency_ms=latency_ms)) as net:
        a, b = net.hosts
        # Three transfers: the link's rate is the fastest (a CPU hiccup of the 2-core host only slows one).
        for port in ("5001", "5002", "5003"):
            sink = _in(b, PROBE, "sink", port)
            _ready(sink)
            sent_before = _tx_bytes(a)
            sender = _in(a, PROBE, "send", b.address, port, str(nbytes))
            seconds = float(sender.communicate(timeout=60)[0])
            sink.wait(timeout=10)
            # The timer also spans the last byte's trip and the answer's trip back: two one-way latencies.
            busy_s = seconds - 2 * latency_ms / 1000
            rates.append(((_tx_bytes(a) - sent_before) * 8 / busy_s, nbytes * 8 / busy_s))
    # Wire: what the sender's interface put on the link, headers included (with segmentation offload
    # the counters and tbf see super-packets, so headers add little); goodput: the payload alone.
    rate = RATE_GBIT * 1e9
    assert 0.90 * rate <= max(wire for wire, _ in rates), rates
    assert all(goodput < wire <= 1.10 * rate for wire, goodput in rates), rates
    assert net.wait_gone()


@pytest.mark.parametrize("latency_ms", [0.0, 5.0])
def test_a_gloo_allreduce_between_two_hosts_runs_at_the_configured_bandwidth(latency_ms: float) -> None:
    numel = 1_000_000  # 4 MB: for two workers gloo's ring sends half of it twice (B bytes each way)
    with EmulatedNetwork(2, LinkShape(bandwidth_gbit=RATE_GBIT, latency_ms=latency_ms)) as net:
        env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0")
        procs = [_in(h, str(HERE / "gloo_allreduce.py"), net.hosts[0].address, str(r), "2", str(numel), env=env)
                 for r, h in enumerate(net.hosts)]
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for seconds, sent in ((float(o[0]), int(o[1])) for o in outs):
        # Two rounds (reduce-scatter, all-gather), each half the payload plus one one-way latency.
        transfer_s = seconds - 2 * latency_ms / 1000
        expected = 4 * numel * 8 / (RATE_GBIT * 1e9)  # the payload's bits at the link's rate
        assert sent >= 4 * numel  # every payload byte crossed the wire, plus headers
        assert expected <= transfer_s * 1.0 and transfer_s <= expected / 0.9 * 1.06, (seconds, expected)
        wire_bit_s = sent * 8 / transfer_s
        assert 0.90 * RATE_GBIT * 1e9 <= wire_bit_s <= 1.02 * RATE_GBIT * 1e9, wire_bit_s


@pytest.mark.parametrize("bandwidth_gbit", [None, RATE_GBIT])
def test_latency_is_the_configured_one_way_delay(bandwidth_gbit: float | None) -> None:
    latency_ms = 5.0
    with EmulatedNetwork(2, LinkShape(bandwidth_gbit=bandwidth_gbit, latency_ms=latency_ms)) as net:
        a, b = net.hosts
        # ICMP echo: b's kernel answers and the pinger runs at real-time priority, so the round trip
        # is the links', not the waits of programs for a core on a busy machine.
        rtt = float(_in(a, PROBE, "icmp_ping", b.address, "50").communicate(timeout=60)[0])
    assert abs(rtt / 2 * 1000 - latency_ms) <= 1.0, rtt


def test_loss_drops_the_configured_share_of_packets() -> None:
    loss_pct, sent = 20.0, 10_000
    with EmulatedNetwork(2, LinkShape(loss_pct=loss_pct)) as net:
        a, b = net.hosts
        counter = _in(b, PROBE, "udp_count", "5004", "1")
        _ready(counter)
        assert _in(a, PROBE, "udp_send", b.address, "5004", str(sent)).wait(timeout=60) == 0
        received = int(counter.communicate(timeout=30)[0])
    # Binomial: the standard deviation of the lost share is 0.4 %; 2 % is five of them.
    assert abs((1 - received / sent) * 100 - loss_pct) <= 2.0, received


@pytest.mark.skipif(kernel_has_netem(), reason="with netem the kernel delays: there is no delay line to lose")
def test_a_dead_delay_line_is_reported_not_waited_on() -> None:
    with EmulatedNetwork(2, LinkShape(latency_ms=1.0)) as net:
        net.check_links()  # both alive
        os.kill(net.delay_line_pids[1], signal.SIGKILL)
        deadline = time.time() + 5
        with pytest.raises(NetworkError, match=f"delay line of {net.hosts[1].namespace} exited"):
            while time.time() < deadline:
                net.check_links()
                time.sleep(0.05)


def test_without_netem_or_iptables_delay_is_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ns_module, "kernel_has_netem", lambda: False)
    real_which = ns_module.shutil.which
    monkeypatch.setattr(ns_module.shutil, "which", lambda tool: None if tool == "iptables" else real_which(tool))
    with pytest.raises(NetworkError, match="needs iptables") as info:
        check_support(LinkShape(latency_ms=5.0))
    assert "\n" not in str(info.value)


def test_without_root_the_error_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ns_module.os, "geteuid", lambda: 1000)
    with pytest.raises(NetworkError, match="need root") as info:
        EmulatedNetwork(2).open()
    assert "\n" not in str(info.value)


OWNER = """
import sys, time
sys.path.insert(0, {root!r})
from backends.network import EmulatedNetwork, LinkShape
net = EmulatedNetwork(2, LinkShape(bandwidth_gbit=0.1, latency_ms=1.0)).__enter__()
import subprocess
for host in net.hosts:
    subprocess.Popen([*host.exec_args(), "sleep", "600"])
print(net.token, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _qdiscs_of(token: str) -> str:
    return "".join(line for line in subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True)
                   .stdout.splitlines(keepends=True) if token in line)


def test_an_owner_killed_with_sigkill_leaves_no_namespace_veth_or_qdisc() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(root=str(ROOT))], text=True, stdout=subprocess.PIPE)
    assert owner.stdout is not None
    token = owner.stdout.readline().strip()
    assert len(leftovers(token)) == 2 + 2 + 1 and _qdiscs_of(token)  # namespaces, veths, bridge, qdiscs
    sleepers = [int(p) for n in leftovers(token) if n.startswith("orchnet-")
                for p in subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()]
    assert len(sleepers) == 2 + (0 if kernel_has_netem() else 2)  # the sleepers, and delay lines without netem
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.time() + 15
    while leftovers(token) and time.time() < deadline:
        time.sleep(0.1)
    assert leftovers(token) == [] and _qdiscs_of(token) == ""
    time.sleep(0.2)
    assert not any(_running(pid) for pid in sleepers)


def test_the_sweep_removes_networks_of_dead_owners_and_keeps_live_ones() -> None:
    with EmulatedNetwork(1) as live:
        dead = EmulatedNetwork(1)
        dead._start_guard = lambda: None  # no guard: only the sweep can find it
        dead.open()
        (ns_module.SYS_CLASS_NET / dead.bridge)  # noqa: B018 - the bridge exists
        subprocess.run(["ip", "link", "set", "dev", dead.bridge, "alias", "orchnet owner=999999999:1"], check=True)
        assert ns_module.sweep_stale() == [dead.token]
        assert leftovers(dead.token) == [] and leftovers(live.token)


def test_with_a_gateway_the_machine_reaches_a_host() -> None:
    with EmulatedNetwork(["head"], subnet="10.214.0.0/24", gateway=True) as net:
        assert net.gateway_address == "10.214.0.254"
        server = _in(net.hosts[0], PROBE, "echo", "5003")
        _ready(server)
        import socket

        with socket.create_connection((net.hosts[0].address, 5003), timeout=5) as conn:
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
        server.kill()
