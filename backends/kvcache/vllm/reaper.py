"""Ends the processes a process started if that process dies first (stdlib only).

vLLM's in-process engine (``AsyncLLM``) runs its engine core and CPU worker as child processes.
When the trial actor that owns them is killed with SIGKILL (the OOM killer, ``kill -9``, a
node agent), nothing in it runs, and vLLM's engine core lives on as an orphan holding memory
and cores. A reaper is a small process in its own session that watches the owner: every
``POLL_S`` it records the owner's descendants that appeared after the reaper started (pid and
start time, so a reused pid is never hit); when the owner is gone it sends SIGTERM to the
recorded ones still alive and their children, then SIGKILL after ``GRACE_S``. When the owner
closes it normally (``Reaper.close``), leftovers of a shutdown that did not finish are killed
after the same grace. Either way it then removes the folder it was given (the engine's scratch
folder, where vLLM's leftover temporary files are). The reaper is a grandchild of the owner, not
a child: a Ray worker that exits kills its own children, which would end the reaper before its
clean-up.

Run as ``python reaper.py <owner-pid> <owner-start-ticks> [<folder>]`` with the owner holding a
pipe to its stdin (``Reaper.start`` does this).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

if __package__:  # imported as backends.kvcache.vllm.reaper
    from backends.procs import ProcStat, all_stats, descendants, read_stat
else:  # run as a script by another environment's Python, which may not have orch: backends/procs.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from procs import ProcStat, all_stats, descendants, read_stat

POLL_S = 0.5
GRACE_S = 5.0
CLOSE = b"close\n"
KILL = b"kill\n"
READY = b"ready"  # followed by the reaper's pid
READY_TIMEOUT_S = 30.0


class Reaper:
    """The owner's handle on its reaper process."""

    def __init__(self, pid: int, commands: IO[bytes]):
        self._pid = pid
        self._commands = commands

    @classmethod
    def start(cls, remove: str | None = None) -> Reaper:
        """Start a reaper that watches this process; what it starts from now on is covered, and
        ``remove`` (a folder) is removed once the reaper has ended it."""
        me = read_stat(os.getpid())
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(me.pid), str(me.start_ticks), *([remove] if remove else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outside the owner's process group and its clean-up
        )
        # Wait for its first snapshot: a child started before it would count as pre-existing.
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        words = proc.stdout.readline().split() if ready else []
        proc.stdout.close()
        if words[:1] != [READY] or len(words) != 2:
            proc.kill()
            raise RuntimeError(f"the process reaper did not start within {READY_TIMEOUT_S:g} s")
        proc.wait()  # the intermediate process, which exited once the reaper was forked
        return cls(int(words[1]), proc.stdin)

    @property
    def pid(self) -> int:
        """The reaper's pid."""
        return self._pid

    def kill_covered(self) -> None:
        """End what is covered now (SIGTERM, then SIGKILL after the grace) and keep watching."""
        self._send(KILL)

    def close(self) -> None:
        """The owner is done: the reaper kills leftovers after a grace period and exits."""
        self._send(CLOSE, last=True)

    def _send(self, command: bytes, last: bool = False) -> None:
        if self._commands.closed:
            return
        try:
            self._commands.write(command)
            self._commands.flush()
            if last:
                self._commands.close()
        except OSError:  # the reaper is gone (BrokenPipeError)
            pass


def _record(seen: dict[int, int], owner: int, preexisting: set[tuple[int, int]], me: int) -> None:
    """Add the owner's current descendants (except those older than the reaper, and itself)."""
    for stat in descendants(owner):
        key = (stat.pid, stat.start_ticks)
        if stat.pid != me and key not in preexisting:
            seen[stat.pid] = stat.start_ticks


def _targets(seen: dict[int, int]) -> list[ProcStat]:
    """Recorded processes that are still the same live processes, plus everything below them."""
    stats = all_stats()
    by_pid = {s.pid: s for s in stats}
    alive = [by_pid[p] for p, ticks in seen.items() if p in by_pid and by_pid[p].start_ticks == ticks
             and by_pid[p].alive]
    found = {s.pid: s for s in alive}
    for stat in alive:
        found.update((d.pid, d) for d in descendants(stat.pid, stats))
    return list(found.values())


def _signal_all(targets: list[ProcStat], sig: int) -> None:
    for stat in targets:
        current = read_stat(stat.pid)
        if current is not None and current.start_ticks == stat.start_ticks:
            try:
                os.kill(stat.pid, sig)
            except ProcessLookupError:
                pass


def _end(seen: dict[int, int], terminate_first: bool) -> None:
    """SIGTERM (when asked) the recorded processes, wait up to the grace, SIGKILL what is left."""
    targets = _targets(seen)
    if terminate_first:
        _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while targets and time.monotonic() < deadline:
        time.sleep(0.1)
        targets = _targets(seen)
    _signal_all(targets, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Watch ``argv[0]`` (pid) started at ``argv[1]`` (ticks) until it closes us or dies, then
    remove the folder ``argv[2]`` if given."""
    if os.fork() > 0:  # go on as a grandchild of the owner (see the module's docstring)
        os._exit(0)
    try:
        return _watch(int(argv[0]), int(argv[1]))
    finally:
        if len(argv) > 2:
            shutil.rmtree(argv[2], ignore_errors=True)


def _watch(owner: int, owner_ticks: int) -> int:
    """Record and end the owner's new descendants (see the module's docstring)."""
    me = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the owner's business
    preexisting = {(s.pid, s.start_ticks) for s in descendants(owner)}
    seen: dict[int, int] = {}
    sys.stdout.buffer.write(READY + b" %d\n" % me)
    sys.stdout.buffer.flush()
    stdin = sys.stdin.buffer
    while True:
        _record(seen, owner, preexisting, me)
        stat = read_stat(owner)
        if stat is None or stat.start_ticks != owner_ticks or not stat.alive:
            _end(seen, terminate_first=True)
            return 0
        readable, _, _ = select.select([stdin], [], [], POLL_S)
        if readable:
            line = stdin.readline()
            if line == KILL:  # the owner gave up on what it started (a start-up timeout)
                _end(seen, terminate_first=True)
                continue
            if line == CLOSE:  # a normal end: vLLM shut down; kill only what failed to exit
                _end(seen, terminate_first=False)
                return 0
            if not line:  # the pipe closed without a word: the owner died (or is dying)
                _record(seen, owner, preexisting, me)
                _end(seen, terminate_first=True)
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
