"""Measurement programs run inside emulated hosts (``python probe.py ROLE ARGS...``): a TCP sink and
timed sender (bandwidth), a one-byte TCP echo and ping and an ICMP ping (latency), a UDP counter
and sender (loss).
Plain sockets, no imports from the project: tests and ``benchmarks/bench_network.py`` start them
with ``ip netns exec``."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_IDENT = 8, 0, 0x6F72


def sink(port: int) -> None:
    """Accept one connection, read until EOF, answer with one byte."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass
            conn.sendall(b"k")


def send(address: str, port: int, nbytes: int) -> None:
    """Send ``nbytes`` and print the seconds from connect to the receiver's answer."""
    chunk = b"x" * (1 << 16)
    with socket.create_connection((address, port)) as conn:
        start = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= conn.send(chunk[: min(left, len(chunk))])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        print(time.perf_counter() - start, flush=True)


def echo(port: int) -> None:
    """Echo one byte back, for as long as the client sends."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(1):
            conn.sendall(data)


def ping(address: str, port: int, count: int) -> None:
    """Print the median round trip of ``count`` one-byte exchanges, in seconds."""
    with socket.create_connection((address, port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"p")
            conn.recv(1)
            rtts.append(time.perf_counter() - start)
        print(sorted(rtts)[len(rtts) // 2], flush=True)


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def icmp_ping(address: str, count: int) -> None:
    """Print the median round trip of ``count`` ICMP echoes, in seconds. The remote kernel answers
    (no program there to wait for a core), and this program runs at real-time priority, so a
    busy machine's scheduling delays stay out of the link's round trip. (Not the kernel's receive
    stamps: they are taken on arrival at the interface, before an ingress delay line holds the
    packet.)"""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(5)
        rtts = []
        for seq in range(count):
            body = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ICMP_IDENT, seq) + b"orchprobe"
            body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
            start = time.perf_counter()
            sock.sendto(body, (address, 0))
            while True:
                data = sock.recv(2048)
                kind, _, _, ident, got = struct.unpack_from("!BBHHH", data, (data[0] & 0x0F) * 4)
                if kind == ICMP_ECHO_REPLY and ident == ICMP_IDENT and got == seq:
                    break
            rtts.append(time.perf_counter() - start)
            time.sleep(0.01)
        print(sorted(rtts)[len(rtts) // 2], flush=True)


def udp_count(port: int, quiet_s: float) -> None:
    """Count datagrams until none came for ``quiet_s`` after the first; print the count."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
        sock.bind(("0.0.0.0", port))
        print("ready", flush=True)
        sock.recv(2048)
        count = 1
        sock.settimeout(quiet_s)
        try:
            while sock.recv(2048):
                count += 1
        except TimeoutError:
            pass
        print(count, flush=True)


def udp_send(address: str, port: int, count: int) -> None:
    """Send ``count`` 100-byte datagrams, paced in bursts of 100 so no socket buffer overflows."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(b"d" * 100, (address, port))
            if i % 100 == 99:
                time.sleep(0.002)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"sink": sink, "send": send, "echo": echo, "ping": ping, "icmp_ping": icmp_ping, "udp_count": udp_count,
     "udp_send": udp_send}[role](
        *[int(a) if a.isdigit() else a for a in args]
    )
