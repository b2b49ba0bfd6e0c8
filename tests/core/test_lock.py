"""One driver per experiment: a running driver refuses a second submit and a sync; cancel never signals a reused pid."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from backends.procs import start_ticks
from orchestrator.cli import main
from orchestrator.lock import Driver, DriverLock
from orchestrator.manifest import Manifest
from orchestrator.store import ExperimentStore
from tests.core.helpers import write_grid


@pytest.fixture
def other_driver():
    """A live process standing in for another experiment's driver."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait(10)


def _lock_for(results: Path, experiment: str, pid: int, start_ticks: int | None) -> Driver:
    driver = Driver(host=socket.gethostname(), pid=pid, start_ticks=start_ticks, started_at=time.time())
    path = results / experiment / "driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(driver.__dict__))
    return driver


def _manifest(results: Path, experiment: str) -> None:
    Manifest.load_or_new(ExperimentStore(results, experiment)).save(force=True)


def test_second_submit_and_sync_are_refused_naming_the_running_driver(tmp_path: Path, other_driver) -> None:
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="busy")
    driver = _lock_for(results, "busy", other_driver.pid, start_ticks(other_driver.pid))
    _manifest(results, "busy")
    submitted = CliRunner().invoke(main, ["submit", str(grid), "--results", str(results)])
    assert submitted.exit_code == 2
    assert submitted.output.strip() == (f"error: busy is already running: its driver is {driver.describe()}; "
                                        "wait for it or stop it with `orch cancel busy`")
    synced = CliRunner().invoke(main, ["sync", "busy", "--results", str(results)])
    assert synced.exit_code == 2 and f"cannot sync busy while its driver runs ({driver.describe()})" in synced.output


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    _lock_for(tmp_path, "old", gone.pid, 12345)
    lock = DriverLock(tmp_path / "old", "old")
    me = lock.acquire()
    assert lock.holder() == me and lock.running() == me
    lock.release()
    assert not (tmp_path / "old" / "driver.lock").exists()


TAKE_LOCK = """
import sys, time
from pathlib import Path
from orchestrator.lock import DriverLock, DriverRunningError
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():  # all start together
    time.sleep(0.005)
try:
    DriverLock(Path(sys.argv[1]), "race").acquire()
    print("acquired", flush=True)
    time.sleep(3)  # stay alive: the lock is live while the others decide
except DriverRunningError:
    print("refused", flush=True)
"""


def test_of_several_submits_that_find_a_stale_lock_exactly_one_takes_it(tmp_path: Path) -> None:
    import sys

    from tests.conftest import REPO

    gone = subprocess.Popen(["true"])
    gone.wait(10)
    _lock_for(tmp_path, "race", gone.pid, 12345)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", TAKE_LOCK, str(tmp_path / "race"), str(tmp_path / f"ready{i}"),
                               str(go)], cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(6)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outcomes = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert outcomes == ["acquired"] + ["refused"] * (len(procs) - 1)


def test_cancel_signals_the_driver_only_while_its_pid_is_the_same_process(tmp_path: Path, other_driver) -> None:
    results = tmp_path / "r"
    _manifest(results, "exp")
    # the recorded start time differs: the pid now belongs to another process
    _lock_for(results, "exp", other_driver.pid, start_ticks(other_driver.pid) + 1)
    refused = CliRunner().invoke(main, ["cancel", "exp", "--results", str(results)])
    assert refused.exit_code == 2 and "is no longer running" in refused.output
    time.sleep(0.2)
    assert other_driver.poll() is None  # not signalled
    _lock_for(results, "exp", other_driver.pid, start_ticks(other_driver.pid))
    cancelled = CliRunner().invoke(main, ["cancel", "exp", "--results", str(results)])
    assert cancelled.exit_code == 0, cancelled.output
    assert other_driver.wait(10) == -signal.SIGINT
