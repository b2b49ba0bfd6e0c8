"""Measurement programs run inside emulated hosts (``python probe.py ROLE ARGS...``): a TCP sink and
timed sender (bandwidth), a one-byte TCP echo and ping (latency), a UDP counter and sender (loss).
Plain sockets, no imports from the project: tests and ``benchmarks/bench_network.py`` start them
with ``ip netns exec``."""

from __future__ import annotations

import socket
import sys
import time


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
    {"sink": sink, "send": send, "echo": echo, "ping": ping, "udp_count": udp_count, "udp_send": udp_send}[role](
        *[int(a) if a.isdigit() else a for a in args]
    )
