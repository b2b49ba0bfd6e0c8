"""`orch submit --address http://HEAD:8265`: the driver runs on a real Ray cluster as a Ray Job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backends.network.ports import free_port
from orchestrator.jobs import submission_id
from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.core.helpers import orch, write_grid
from tests.support.procs import stop_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node started with `ray start --block` in its own session (stopped by PID, then group)."""
    gcs, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp}", "--include-dashboard=true",
         # the job agent's port: Ray's default (52365) may be held by another Ray on this machine
         f"--dashboard-agent-listen-port={free_port()}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # job drivers run `orch` from the PATH the head was started with
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
    )
    address = f"http://127.0.0.1:{dashboard}"
    token = (Path.home() / ".ray" / "auth_token")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
            if httpx.get(f"{address}/api/version", timeout=2, headers=headers).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray head did not start")
    yield address
    # SIGTERM to `ray start` alone: it drains the node and ends its processes in ~3 s. Sent to the
    # whole group, every process gets it at once and the drain waits out its 30 s limit.
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        stop_group(proc, signal.SIGKILL, grace_s=10)  # what is left of the group (forkserver helpers)


def test_submit_to_a_cluster_runs_the_driver_as_a_ray_job(head: str, tmp_path: Path) -> None:
    grid = write_grid(tmp_path, experiment="remote", grid={"x": [1, 2, 3]})
    results = tmp_path / "remote-results"
    first = orch("submit", str(grid), "--address", head, "--remote-results", str(results))
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = submission_id("remote", grid.read_text())
    assert f"submitted job {job_id}" in first.stdout
    assert "done 3 | running 0 | failed 0 | queued 0" in first.stdout  # the driver's log, followed
    manifest = ExperimentStore(results, "remote").load_manifest()
    assert sorted(e["state"] for e in manifest["trials"].values()) == ["done"] * 3
    status = orch("status", "remote", "--address", head)
    assert f"{job_id}  remote  SUCCEEDED" in status.stdout
    # the same grid again: same job id, resubmitted after the finished one, and nothing reruns
    again = orch("submit", str(grid), "--address", head, "--remote-results", str(results))
    assert again.returncode == 0 and f"submitted job {job_id}" in again.stdout
    assert "done 3 | running 0" in again.stdout
    assert len(ExperimentStore(results, "remote").load_manifest()["submissions"]) == 2


def test_node_list_waits_for_the_head_to_register() -> None:
    """Just after `ray start` the dashboard answers before the head's raylet is listed: the
    placement check asks again instead of refusing the grid for 'no alive nodes'."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from orchestrator.access import parse_address
    from orchestrator.jobs import JobsTarget, cluster_nodes

    answers = [[], [], [{"node_ip": "127.0.0.1", "state": "ALIVE", "resources_total": {"CPU": 2.0, "node:x": 1}}]]
    asked = []

    class StateApi(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            rows = answers[min(len(asked), len(answers) - 1)]
            asked.append(self.path)
            body = json.dumps({"data": {"result": {"result": rows}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), StateApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = JobsTarget(parse_address(f"http://127.0.0.1:{server.server_address[1]}"), {})
        assert cluster_nodes(api, settle_s=0) == []  # one look: the empty answer as given
        asked.clear()
        assert cluster_nodes(api, settle_s=10) == [("127.0.0.1", {"CPU": 2.0})]
        assert len(asked) == 3 and all(p.startswith("/api/v0/nodes") for p in asked)
    finally:
        server.shutdown()
        server.server_close()
