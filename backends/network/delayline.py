"""A user-space delay line for kernels without netem: holds every queued packet for a fixed time.

Runs inside a host's namespace (``python -m backends.network.delayline QUEUE DELAY_MS``), bound
to the netfilter queue that an iptables ``NFQUEUE`` rule fills (``impairment.py``). The kernel
keeps the packets; this process only learns each packet's id (copy mode ``meta``: no payload is
copied) and, ``DELAY_MS`` after the packet arrived, returns one batch verdict "accept every id
up to N". Ids grow in arrival order and the delay is the same for all, so one batch verdict
releases exactly the packets that are due. GSO super-packets are queued whole (``F_GSO``), so
at 1 Gb/s a few thousand packets a second pass, not ~80 thousand MTU frames.

Prints ``ready`` once bound. Exits when killed (the network's teardown kills every process in
its namespaces); packets still queued then are dropped with the namespace.
"""

from __future__ import annotations

import collections
import ctypes
import os
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_TIMESTAMP = 1, 2, 4
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")
NFGEN_HEADER = struct.Struct("!BBH")
NLATTR_HEADER = struct.Struct("=HH")
QUEUE_MAXLEN = 1 << 16  # packets held at most; beyond it the kernel drops (as a full netem queue does)
RECV_BUFFER = 8 << 20
PR_SET_TIMERSLACK = 29
REALTIME_PRIORITY = 10
SO_TIMESTAMP = 29  # Linux; the socket module does not export it


def _attr(kind: int, payload: bytes) -> bytes:
    body = NLATTR_HEADER.pack(NLATTR_HEADER.size + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    payload = NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + payload


def _attrs(data: memoryview) -> dict[int, memoryview]:
    found, offset = {}, 0
    while offset + NLATTR_HEADER.size <= len(data):
        length, kind = NLATTR_HEADER.unpack_from(data, offset)
        if length < NLATTR_HEADER.size:
            break
        found[kind & 0x3FFF] = data[offset + NLATTR_HEADER.size: offset + length]
        offset += (length + 3) & ~3
    return found


class DelayLine:
    """One bound netfilter queue whose packets are released ``delay_s`` after they arrived."""

    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue, self.delay_s = queue, delay_s
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, RECV_BUFFER)  # SO_RCVBUFFORCE (root)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id)
        # Any socket asking for receive timestamps makes the kernel stamp every arriving packet,
        # and the queue passes the stamp on (NFQA_TIMESTAMP); wall clock, as the stamps are.
        self.stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stamps.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    def bind(self) -> None:
        """Bind the queue: ids and metadata only, GSO packets whole, a deep queue."""
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
                        + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
                        + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)))

    def _configure(self, attrs: bytes) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq=1))
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply)
        error = struct.unpack_from("=i", reply, NLMSG_HEADER.size)[0] if kind == NLMSG_ERROR else 0
        if error:
            raise OSError(-error, f"nfqueue {self.queue} config: {os.strerror(-error)}")

    def _receive(self, buffer: bytearray) -> None:
        """Read every pending packet notice; each packet is due ``delay_s`` from now."""
        while True:
            try:
                size = self.sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            due = time.time() + self.delay_s
            view, offset = memoryview(buffer)[:size], 0
            while offset + NLMSG_HEADER.size <= size:
                length, kind, _, _, _ = NLMSG_HEADER.unpack_from(view, offset)
                if length < NLMSG_HEADER.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    attrs = _attrs(view[offset + NLMSG_HEADER.size + NFGEN_HEADER.size: offset + length])
                    packet_due = due
                    if NFQA_TIMESTAMP in attrs:  # the kernel's arrival time: our wake-up lag is not added
                        sec, usec = struct.unpack_from("!QQ", attrs[NFQA_TIMESTAMP])
                        packet_due = min(due, sec + usec / 1e6 + self.delay_s)
                    self.held.append((packet_due, struct.unpack_from("!I", attrs[NFQA_PACKET_HDR])[0]))
                offset += (length + 3) & ~3

    def _release_due(self) -> None:
        last = None
        now = time.time()
        while self.held and self.held[0][0] <= now:
            last = self.held.popleft()[1]
        if last is not None:
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))

    def run(self) -> None:
        """Forever: wait for packets or the next due time, release what is due."""
        buffer = bytearray(1 << 20)
        while True:  # select, not poll: its timeout has microseconds, poll's whole milliseconds
            timeout = None if not self.held else self.held[0][0] - time.time()
            if timeout is None or timeout > 0:
                select.select([self.sock], [], [], timeout)
            self._receive(buffer)
            self._release_due()


def main() -> None:
    """``python -m backends.network.delayline QUEUE DELAY_MS``."""
    queue, delay_ms = int(sys.argv[1]), float(sys.argv[2])
    # Wake-ups exactly when due: the default 50 us of timer slack would add to every delay, and on
    # a busy machine a normal process waits for a core for milliseconds. The delay line is the
    # network's hardware: real-time priority (it sleeps in select between packets).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except PermissionError:
        pass  # no CAP_SYS_NICE (some containers): the delay is then only as exact as the load allows
    line = DelayLine(queue, delay_ms / 1000)
    line.bind()
    print("ready", flush=True)
    line.run()


if __name__ == "__main__":
    main()
