"""Runs one command as a child and takes its whole process group down with it (stdlib only).

Started by ``server.py`` as the leader of a new process group, from the vLLM virtualenv's Python,
as ``python supervise.py <parent-pid> [--remove <folder>] -- <command...>``. vLLM spawns
engine-core processes of its own; they stay in this group, so one ``killpg`` ends them all. The supervisor ends the group
when it is told to (SIGTERM/SIGINT), when the command exits, or when the process that started
it is gone (its parent pid changes) — that last case covers a trial actor killed with SIGKILL,
which cannot run any clean-up of its own. In that case it also removes ``<folder>`` once the group
has ended (the server's scratch folder, where vLLM's leftover temporary files are), which
otherwise is the starter's to remove: it may keep a failed start's log from there first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported as backends.kvcache.vllm.supervise
    from backends.procs import group_pids
else:  # run as a script by another environment's Python, which may not have orch: backends/procs.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from procs import group_pids

POLL_S = 0.5
GRACE_S = 10.0


def _group_members() -> list[int]:
    """Pids in this process group other than this process."""
    return group_pids(os.getpgrp(), exclude=os.getpid())


def _end_group(child: subprocess.Popen) -> None:
    """SIGTERM the rest of the group, wait a grace period, then SIGKILL whatever is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        child.poll()
        if not _group_members():
            return
        time.sleep(0.1)
    for pid in _group_members():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.poll()


def main(argv: list[str]) -> int:
    """Supervise the command after ``--`` on behalf of the process ``argv[0]``."""
    parent = int(argv[0])
    options, command = argv[1:argv.index("--")], argv[argv.index("--") + 1:]
    remove = options[1] if options[:1] == ["--remove"] else None
    try:
        return _supervise(parent, command)
    finally:
        if remove is not None and os.getppid() != parent:  # nobody else is left to do it
            shutil.rmtree(remove, ignore_errors=True)


def _supervise(parent: int, command: list[str]) -> int:
    """Run ``command`` until it exits or we are told to stop or orphaned; its exit code."""
    stopping = {"flag": False}

    def request_stop(_signum: int, _frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if os.getppid() != parent:  # the starter died before we got here
        return 1
    child = subprocess.Popen(command)
    while True:
        code = child.poll()
        if code is not None:  # ended on its own (a failed start-up): end any helpers it left
            _end_group(child)
            return code
        if stopping["flag"] or os.getppid() != parent:
            _end_group(child)
            return 143
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
