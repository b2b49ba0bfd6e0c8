"""The CLI end to end, each run in its own process with an embedded Ray: Ctrl-C and a killed driver."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.core.helpers import ORCH, mlflow_trial_runs, orch, parquet_trial_ids, write_grid
from tests.support.procs import stop_group

pytestmark = pytest.mark.slow


def _start(grid: Path, results: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*ORCH, "submit", str(grid), "--results", str(results), "--num-cpus", "2", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=None if env is None else os.environ | env,
    )


def _wait_for(predicate, timeout_s: float = 180.0, what: str = "condition") -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _states(results: Path, experiment: str) -> dict[str, int]:
    manifest = ExperimentStore(results, experiment).load_manifest() or {"trials": {}}
    counts: dict[str, int] = {}
    for entry in manifest["trials"].values():
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
    return counts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_running_trials_and_records_them(tmp_path: Path, sig: int) -> None:
    pids = tmp_path / "pids"
    grid = write_grid(tmp_path, experiment="interrupt", grid={"x": [1, 2, 3, 4]},
                      base={"sleep_s": 120.0, "pid_file": str(pids / "worker")})
    results = tmp_path / "r"
    proc = _start(grid, results)
    try:
        _wait_for(lambda: _states(results, "interrupt").get("running") == 2, what="two running trials")
        # the embedded Ray's dashboard answers on loopback while the grid runs
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        version = httpx.get("http://127.0.0.1:8265/api/version", timeout=10, headers={"Authorization": f"Bearer {token}"})
        assert version.status_code == 200 and "ray_version" in version.json()
        _wait_for(lambda: (pids / "worker").exists(), what="a worker pid")
        worker_pid = int((pids / "worker").read_text().split()[0])
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, output
    finally:
        stop_group(proc, signal.SIGKILL)
    manifest = ExperimentStore(results, "interrupt").load_manifest()
    states = sorted(e["state"] for e in manifest["trials"].values())
    assert states == ["cancelled", "cancelled", "queued", "queued"]
    assert manifest["submissions"][-1]["status"] == "interrupted"
    cancelled = [tid for tid, e in manifest["trials"].items() if e["state"] == "cancelled"]
    assert parquet_trial_ids(results, "interrupt", "trials") == sorted(cancelled)
    status = orch("status", "interrupt", "--results", str(results))
    assert status.returncode == 0 and "interrupted" in status.stdout
    rows = [line for line in status.stdout.splitlines() if re.search(r"[0-9a-f]{10}-0", line)]
    assert sorted(re.search(r"(cancelled|queued)", row).group(1) for row in rows) == states
    _wait_for(lambda: not Path(f"/proc/{worker_pid}").exists(), 30, "the cancelled worker to exit")


def test_killed_driver_then_resubmit_completes_and_all_records_agree(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, experiment="crash", grid={"x": [1, 2, 3, 4, 5, 6]}, base={"sleep_s": 1.5})
    results = tmp_path / "r"
    proc = _start(grid, results, "--no-dashboard")
    try:
        _wait_for(lambda: _states(results, "crash").get("done", 0) >= 2, what="two done trials")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_group(proc, signal.SIGKILL)
    before = _states(results, "crash")
    assert before.get("done", 0) < 6
    second = orch("submit", str(grid), "--results", str(results), "--no-dashboard", "--num-cpus", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    manifest = json.loads((results / "crash" / "manifest.json").read_text())
    ids = sorted(manifest["trials"])
    assert len(ids) == 6 and all(e["state"] == "done" for e in manifest["trials"].values())
    # trials done before the kill were not run again
    finished_now = [line for line in second.stdout.splitlines() if re.match(r"done\s+[0-9a-f]{10}-0 ", line)]
    assert len(finished_now) == 6 - before["done"]
    assert parquet_trial_ids(results, "crash", "toy_summary") == ids
    assert parquet_trial_ids(results, "crash", "trials") == ids
    runs = mlflow_trial_runs(results, "crash")
    assert sorted(r.data.tags["orch.trial_id"] for r in runs) == ids
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(e["synced"] for e in manifest["trials"].values())
    report = orch("report", "crash", "--results", str(results))
    assert report.returncode == 0 and "toy_summary" in report.stdout
    for x in range(1, 7):
        assert f"│ {x} " in report.stdout and f" {x * 10} " in report.stdout


def test_orch_ui_serves_the_mlflow_ui_on_loopback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([*ORCH, "ui", "--results", str(tmp_path / "r"), "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(answers, 120, "the MLflow UI")
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "mlflow" in page.text.lower()
    finally:
        stop_group(proc, signal.SIGKILL)


def test_two_experiments_submitted_side_by_side_both_complete(tmp_path: Path) -> None:
    results = tmp_path / "r"
    # Their own temp dir (Ray's session stays in /tmp/ray: its socket paths have a length limit),
    # to see what the two embedded Rays leave there.
    temp = tmp_path / "t"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "RAY_TMPDIR": "/tmp"}
    first = _start(write_grid(tmp_path, "a.yaml", experiment="left", grid={"x": [1, 2]}, base={"sleep_s": 8.0}),
                   results, env=env)
    try:
        _wait_for(lambda: _states(results, "left").get("running") == 2, what="the first submission's trials")
        # the dashboard's forkserver has its socket in a multiprocessing folder of the temp dir
        assert list(temp.glob("pymp-*/listener-*"))
        second = _start(write_grid(tmp_path, "b.yaml", experiment="right", grid={"x": [1, 2]}), results, env=env)
        try:
            out_second, _ = second.communicate(timeout=240)
            out_first, _ = first.communicate(timeout=240)
        finally:
            stop_group(second, signal.SIGKILL)
    finally:
        stop_group(first, signal.SIGKILL)
    assert (first.returncode, second.returncode) == (0, 0), out_first + out_second
    # the second embedded Ray found the dashboard port taken and started beside the first
    assert "embedded Ray started beside another Ray on this machine (port 8265 is taken)" in out_second
    assert _states(results, "left") == {"done": 2} and _states(results, "right") == {"done": 2}
    # each driver removed its Ray's multiprocessing folder (Ray leaves it behind)
    assert list(temp.glob("pymp-*")) == []
