"""Stopping the process groups that tests start."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session``); SIGKILL
    it if it has not exited within ``grace_s``."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group has ended: only reap ``proc``
        pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
