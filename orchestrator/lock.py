"""One driver per experiment: a lock file naming the running driver (host, pid, process start time).

``orch submit`` takes ``results/<experiment>/driver.lock`` before it starts Ray and removes it when
it ends; a second submit of the same experiment is refused with the running driver named, and
``orch sync`` refuses while it runs. A lock whose process is gone (or whose pid now belongs to
another process, told apart by the process start time) is stale and taken over. ``orch cancel``
signals the pid only when its start time still matches.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from backends.procs import start_ticks
from orchestrator.spec import SpecError
from orchestrator.store import atomic_write_bytes

LOCK_NAME = "driver.lock"


class DriverRunningError(SpecError):
    """Another driver runs this experiment; ``str(err)`` names it in one line."""


@dataclass(frozen=True)
class Driver:
    """A driver process: where it runs and which process it is."""

    host: str
    pid: int
    start_ticks: int | None  # None where /proc is unavailable
    started_at: float

    @classmethod
    def this_process(cls) -> Driver:
        """The calling process."""
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, start_ticks=start_ticks(pid), started_at=time.time())

    def is_alive(self) -> bool:
        """Whether this driver still runs (a driver on another host is assumed to)."""
        if self.host != socket.gethostname():
            return True
        ticks = start_ticks(self.pid)
        if ticks is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return self.start_ticks is None
        return self.start_ticks is None or ticks == self.start_ticks

    def describe(self) -> str:
        """'pid 123 on host h since 2026-12-02 01:02:03 UTC'."""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"pid {self.pid} on host {self.host} since {since}"


class DriverLock:
    """The lock file of one experiment's folder."""

    def __init__(self, experiment_dir: Path, experiment: str):
        self.path = Path(experiment_dir) / LOCK_NAME
        self.experiment = experiment
        self.held: Driver | None = None

    def holder(self) -> Driver | None:
        """The driver named in the lock, alive or not (None: no readable lock)."""
        try:
            return Driver(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> Driver | None:
        """The driver that holds the lock and still runs, or None."""
        driver = self.holder()
        return driver if driver is not None and driver.is_alive() else None

    def acquire(self) -> Driver:
        """Take the lock for this process; a stale lock is replaced, a live one refused."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Driver.this_process()
        # One process decides at a time (an flock on a guard file beside the lock): two submits
        # that both found a stale lock could otherwise each remove the other's new one. The lock
        # itself is written whole (temp file, rename), so it is never read half-written.
        with open(self.path.with_name(f".{LOCK_NAME}.guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            other = self.holder()
            if other is not None and other.is_alive():
                raise DriverRunningError(
                    f"{self.experiment} is already running: its driver is {other.describe()}; "
                    f"wait for it or stop it with `orch cancel {self.experiment}`"
                )
            atomic_write_bytes(self.path, json.dumps(asdict(me)).encode())  # replaces a stale lock
        self.held = me
        return me

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held is not None and self.holder() == self.held:
            self.path.unlink(missing_ok=True)
        self.held = None

    def refuse_while_running(self, action: str) -> None:
        """Raise DriverRunningError if a driver runs this experiment."""
        driver = self.running()
        if driver is not None:
            raise DriverRunningError(f"cannot {action} {self.experiment} while its driver runs ({driver.describe()})")
