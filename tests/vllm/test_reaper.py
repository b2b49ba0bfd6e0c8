"""The process reaper: what an owner started is ended when the owner dies or closes it, and
nothing the owner started before the reaper is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from backends.procs import descendants, read_stat


def _alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.alive


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _owner(tmp_path: Path, then: str) -> tuple[subprocess.Popen, int, int, list[int]]:
    """An owner process: a child started before its reaper, then the reaper (which is to remove
    ``tmp_path / "scratch"``), then `sh` with a grandchild; it prints (old child, reaper, covered
    pids) and does ``then``."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "left-by-vllm").write_text("")
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(Path.cwd())!r})
        from backends.procs import descendants
        from backends.kvcache.vllm.reaper import Reaper
        old = subprocess.Popen(["sleep", "300"])
        reaper = Reaper.start(remove={str(scratch)!r})
        sh = subprocess.Popen(["/bin/sh", "-c", "sleep 301 & sleep 302"])
        while len(descendants(sh.pid)) < 2:
            time.sleep(0.01)
        time.sleep(1.2)  # past two reaper snapshots
        covered = [sh.pid] + [d.pid for d in descendants(sh.pid)]
        print(old.pid, reaper.pid, *covered, flush=True)
        {then}
        time.sleep(300)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    old, reaper, *covered = (int(x) for x in owner.stdout.readline().split())
    return owner, old, reaper, covered


def test_killing_the_owner_ends_what_it_started_after_the_reaper(tmp_path: Path) -> None:
    owner, old, reaper, covered = _owner(tmp_path, then="")
    try:
        assert len(covered) == 3 and all(_alive(p) for p in covered)
        os.kill(owner.pid, signal.SIGKILL)  # no clean-up of its own can run
        owner.wait()
        assert _wait_gone(covered, within_s=15) == []
        assert _wait_gone([reaper], within_s=10) == []
        assert not (tmp_path / "scratch").exists()
        assert _alive(old)  # started before the reaper: not its business
    finally:
        os.kill(old, signal.SIGKILL)


def test_close_kills_only_leftovers_and_ends_the_reaper(tmp_path: Path) -> None:
    owner, old, reaper, covered = _owner(tmp_path, then="reaper.close()")
    try:
        # The owner lives on; the covered processes ignore nothing, so they are killed after the
        # grace period, and the reaper exits.
        assert _wait_gone(covered, within_s=20) == []
        assert _wait_gone([reaper], within_s=10) == []
        assert not (tmp_path / "scratch").exists()
        assert _alive(owner.pid) and _alive(old)
    finally:
        owner.kill()
        owner.wait()
        os.kill(old, signal.SIGKILL)


def test_descendants_walks_the_whole_tree() -> None:
    sh = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(sh.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        mine = {d.pid for d in descendants(os.getpid())}
        assert sh.pid in mine and len(mine & {d.pid for d in descendants(sh.pid)}) == 2
    finally:
        for d in descendants(sh.pid):
            os.kill(d.pid, signal.SIGKILL)
        sh.kill()
        sh.wait()
