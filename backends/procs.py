"""Reading the process table from /proc: the one place that parses ``/proc/<pid>/stat``.

Stdlib only: imported by the driver lock, the network guard, and scripts that run under another
environment's Python (vLLM's ``supervise.py`` and ``reaper.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    start_ticks: int  # start time since boot: with the pid, identifies a process across pid reuse

    @property
    def alive(self) -> bool:
        """Not a zombie (or dead) entry."""
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """One process's stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: count fields after the last ')'.
            fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp ...
    except (OSError, IndexError):
        return None
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), or None when it is gone or /proc is unreadable."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_ticks


def all_stats() -> list[ProcStat]:
    """Every process visible in /proc."""
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                stats.append(stat)
    return stats


def group_pids(pgid: int, exclude: int | None = None) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    return [s.pid for s in all_stats() if s.pgrp == pgid and s.alive and s.pid != exclude]


def descendants(pid: int, stats: list[ProcStat] | None = None) -> list[ProcStat]:
    """Live processes below ``pid`` in the process tree (children, their children, ...)."""
    children: dict[int, list[ProcStat]] = {}
    for stat in stats if stats is not None else all_stats():
        if stat.alive:
            children.setdefault(stat.ppid, []).append(stat)
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child.pid)
    return found
