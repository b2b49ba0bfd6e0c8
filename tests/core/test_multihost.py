"""A real multi-host Ray cluster: a head and three workers, each in its own network namespace.

Each host has its own address on a bridge (backends/network), its own Ray node started with
`ray start` and custom resources; the test process is outside the namespaces and reaches the
head through the bridge's gateway address, as a laptop reaches a cluster. Token auth is on,
as cluster.yaml sets it up: one token, generated once, in each node's ~/.ray/auth_token and in
the submitter's ~/.orch/tokens/HEAD. Everything is torn down at the end, also on failure (the
namespace helper kills every process left in the namespaces and removes them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from backends.network import EmulatedNetwork
from backends.network.namespaces import leftovers
from orchestrator import access
from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.core.helpers import ORCH, mlflow_trial_runs, parquet_trial_ids, write_grid

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each namespace has its own ports: no clash with other Rays here
WORKERS = {"w1": 1, "w2": 1, "w3": 1}  # host -> CPUs; a 2-worker training trial leaves one host spare
# A host cut off does not answer: each missed health check waits out its timeout (Ray's default 10 s,
# 4 x 10 s before the node is declared dead); 2 s still lets a busy host's raylet answer.
FAST_HEALTH = json.dumps({"health_check_period_ms": 500, "health_check_timeout_ms": 2000,
                          "health_check_failure_threshold": 4})


class Cluster:
    """The running namespace cluster: hosts, node processes, the submitter's environment."""

    def __init__(self, net: EmulatedNetwork, root: Path) -> None:
        self.net = net
        self.hosts = {h.name: h for h in net.hosts}
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Ray's socket paths must stay under 108 bytes: its session folders live in a short folder.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="omh", dir="/tmp"))
        self.node_home = root / "node-home"  # what cluster.yaml's file_mounts give every node
        self.client_env = dict(os.environ, HOME=str(root / "client-home"), ORCH_TOKENS_DIR=str(root / "tokens"))
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ORCH_TOKEN_FILE"):
            self.client_env.pop(key, None)

    @property
    def head(self) -> str:
        """The head's address."""
        return self.hosts["head"].address

    @property
    def jobs_address(self) -> str:
        """The head's Jobs API."""
        return f"http://{self.head}:{DASHBOARD_PORT}"

    def node_env(self) -> dict[str, str]:
        """A node's environment: its own HOME with the token, `orch` on the PATH, Ray's interface rules."""
        env = dict(os.environ, HOME=str(self.node_home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        # At 0, `ray start --address` refuses to join a head that is not on loopback.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            env.pop(key, None)
        return env

    def start(self, name: str, *args: str, env: dict[str, str]) -> None:
        """`ray start --block` inside host ``name``, in a session of its own."""
        host = self.hosts[name]
        temp = self.ray_temp / name
        self.procs[name] = subprocess.Popen(
            [*host.exec_args(), RAY, "start", "--block", f"--node-ip-address={host.address}", f"--temp-dir={temp}",
             "--disable-usage-stats", *args],
            cwd=REPO, env=env, stdout=(self.root / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def nodes(self) -> list[dict]:
        """The state API's alive nodes (node_id, node_ip, resources_total), asked with the token."""
        token = (self.root / "tokens" / self.head).read_text().strip()
        response = httpx.get(f"{self.jobs_address}/api/v0/nodes", params={"detail": "1"}, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})
        response.raise_for_status()
        return [n for n in response.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """host name -> Ray node id."""
        by_ip = {n["node_ip"]: n["node_id"] for n in self.nodes()}
        return {name: by_ip[host.address] for name, host in self.hosts.items() if host.address in by_ip}

    def orch(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """`orch` run from outside the namespaces, as the user's laptop."""
        return subprocess.run([*ORCH, *args], cwd=REPO, env=self.client_env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    cleanup: list[Path] = []
    try:
        with EmulatedNetwork(["head", *WORKERS], subnet="10.214.0.0/24", gateway=True) as net:
            ray_cluster = Cluster(net, root)
            cleanup.append(ray_cluster.ray_temp)
            # The token, generated once on the submitter's machine, shipped to every node's ~/.ray/auth_token.
            os.environ[access.TOKENS_DIR_ENV] = str(root / "tokens")
            try:
                token_path, _ = access.new_token(ray_cluster.head)
            finally:
                del os.environ[access.TOKENS_DIR_ENV]
            (ray_cluster.node_home / ".ray").mkdir(parents=True)
            shutil.copy(token_path, ray_cluster.node_home / ".ray" / "auth_token")
            # The head as the issue's user started it: no RAY_AUTH_MODE, a token under ~/.ray turns auth on.
            ray_cluster.start("head", "--head", f"--port={GCS_PORT}", "--num-cpus=0", "--resources={\"head_host\": 1}",
                              f"--dashboard-host={ray_cluster.head}", f"--dashboard-port={DASHBOARD_PORT}",
                              "--include-dashboard=true", f"--system-config={FAST_HEALTH}", env=ray_cluster.node_env())
            for name, cpus in WORKERS.items():
                # A joining node never turns auth on by itself: cluster.yaml sets RAY_AUTH_MODE=token on every node.
                ray_cluster.start(name, f"--address={ray_cluster.head}:{GCS_PORT}", f"--num-cpus={cpus}",
                                  f"--resources={{\"host_{name}\": 1, \"pool\": 1}}",
                                  env=dict(ray_cluster.node_env(), RAY_AUTH_MODE="token"))
            deadline = time.time() + 150
            while True:
                try:
                    if len(ray_cluster.nodes()) == 1 + len(WORKERS):
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or any(p.poll() is not None for p in ray_cluster.procs.values()):
                    logs = {p.name: p.read_text()[-1500:] for p in root.glob("*.log")}
                    pytest.fail(f"the namespace cluster did not come up: {logs}")
                time.sleep(1)
            yield ray_cluster
    finally:  # after the namespaces' processes are gone (the network closes first)
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
    assert not leftovers(net.token), "the namespace cluster was not torn down"


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_access_is_refused_with_one_line_each(cluster: Cluster, tmp_path: Path) -> None:
    # no token for this cluster on the submitter's machine
    bare = dict(cluster.client_env, ORCH_TOKENS_DIR=str(tmp_path / "none"))
    result = subprocess.run([*ORCH, "status", "--address", cluster.jobs_address], cwd=REPO, env=bare,
                            capture_output=True, text=True, timeout=60)
    assert "requires a token and none is configured for " + cluster.head in _error_line(result)
    # a wrong token, through the Jobs API and through the GCS
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    for address in (cluster.jobs_address, f"{cluster.head}:{GCS_PORT}"):
        grid = write_grid(tmp_path, experiment="refused")
        result = cluster.orch("submit", str(grid), "--address", address, "--token-file", str(wrong))
        assert f"the cluster at {address} refused the token from {wrong}" in _error_line(result)
    # unreachable: a port nothing listens on, and an address no host has (checked in-process: no CLI start-up)
    with pytest.raises(access.AccessError, match=r"cannot reach the Ray cluster at .*:9 \(connection refused\)"):
        access.check_reachable(access.parse_address(f"http://{cluster.hosts['w2'].address}:9"))
    begin = time.monotonic()
    with pytest.raises(access.AccessError, match=r"10.214.0.77:6379 \((no answer within 5 s|no route to host)\)"):
        access.check_reachable(access.parse_address("10.214.0.77:6379"))
    assert time.monotonic() - begin < 10
    # a grid no node can hold is refused before submission, naming each node's resources
    grid = write_grid(tmp_path, experiment="too-big", resources={"num_cpus": 2})
    line = _error_line(cluster.orch("submit", str(grid), "--address", cluster.jobs_address))
    assert "needs CPU=2, which no node can hold" in line
    for name in WORKERS:
        assert f"node {cluster.hosts[name].address}: CPU=1 " in line and f"host_{name}=1" in line
    # so is a training grid without storage_path on a cluster of several nodes (the kind's check_cluster)
    training = REPO / "grids" / "quickstart-training.yaml"
    line = _error_line(cluster.orch("submit", str(training), "--address", cluster.jobs_address))
    assert f"training on a cluster of {len(WORKERS) + 1} nodes needs storage_path" in line
    token = (cluster.root / "tokens" / cluster.head).read_text().strip()
    jobs = httpx.get(f"{cluster.jobs_address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert isinstance(jobs.json(), list)
    submitted = {(j.get("metadata") or {}).get("orch.experiment") for j in jobs.json()}
    assert not submitted & {"too-big", "quickstart-training"}


def test_the_token_goes_only_to_its_own_cluster(cluster: Cluster) -> None:
    """Another host's server sees no token, though the submitter holds the head's token and a local Ray token."""
    home = Path(cluster.client_env["HOME"])
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text("local-ray-token")
    foreign = cluster.hosts["w1"]
    recorder = subprocess.Popen([*foreign.exec_args(), sys.executable, "-c", _RECORDER], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert recorder.stdout is not None and recorder.stdout.readline().strip() == "ready"
        result = cluster.orch("status", "--address", f"http://{foreign.address}:8266")
        assert f"requires a token and none is configured for {foreign.address}" in _error_line(result)
        seen = recorder.stdout.readline().strip()
    finally:
        recorder.kill()
        recorder.wait(10)
    assert seen == "authorization=None"


# A dashboard stand-in on another host: prints each request's Authorization header, answers 401.
_RECORDER = """
import http.server
class Recorder(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"authorization={self.headers.get('Authorization')}", flush=True)
        self.send_response(401)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("0.0.0.0", 8266), Recorder)
print("ready", flush=True)
server.serve_forever()
"""


def test_a_driver_on_the_head_uses_the_local_token_and_pins_trials_by_custom_resource(cluster: Cluster,
                                                                                      tmp_path: Path) -> None:
    """The issue's case: a head started with ~/.ray/auth_token present, `orch submit --address HEAD:6379` on it."""
    results = tmp_path / "r"
    grid = write_grid(tmp_path, experiment="pinned", grid={"x": [1, 2]}, resources={"num_cpus": 1, "host_w2": 1})
    env = cluster.node_env()
    result = subprocess.run([*cluster.hosts["head"].exec_args(), *ORCH, "submit", str(grid), "--address",
                             f"{cluster.head}:{GCS_PORT}", "--results", str(results), "--no-dashboard"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = ExperimentStore(results, "pinned").load_manifest()
    assert {e["node"] for e in manifest["trials"].values()} == {cluster.node_ids()["w2"]}


def _namespace_of(pid: int) -> str:
    """The network namespace a process runs in (`ip netns identify`), '' if none or gone."""
    result = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
    return result.stdout.strip()


def _registered_checkpoint(storage: Path) -> bool:
    """Ray Train has recorded a checkpoint of the run under ``storage`` (not merely uploaded files)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


def _rank_hosts(store: ExperimentStore, cluster: Cluster, exclude: set[int]) -> tuple[dict[int, int], dict[int, str]]:
    """Ranks 0 and 1's live worker PIDs (none of ``exclude``) and host names, or two empty dicts."""
    pids = {int(p.name[4:-4]): p for p in store.path.glob("work/*/pids/rank*.pid")}
    if set(pids) != {0, 1}:
        return {}, {}
    try:
        numbers = {rank: int(path.read_text()) for rank, path in pids.items()}
    except ValueError:  # being written
        return {}, {}
    by_namespace = {host.namespace: name for name, host in cluster.hosts.items()}
    hosts = {rank: by_namespace.get(_namespace_of(pid), "") for rank, pid in numbers.items()}
    if exclude & set(numbers.values()) or not all(hosts.values()):
        return {}, {}
    return numbers, hosts


def _take_a_rank_s_host_down(cluster: Cluster, store: ExperimentStore, storage: Path, seen: dict,
                             stop: threading.Event) -> None:
    """Once Ray Train has registered a checkpoint, cut off the host of a rank (not the trial actor's host:
    link down, then its raylet and every process on it killed); then note where the restarted ranks run."""
    node_ids = cluster.node_ids()
    while not stop.is_set():
        manifest = store.load_manifest() or {"trials": {}}
        actor_nodes = {e.get("node") for e in manifest["trials"].values()} - {None}
        pids, hosts = _rank_hosts(store, cluster, set())
        if _registered_checkpoint(storage) and pids and actor_nodes:
            actor_hosts = {name for name, node in node_ids.items() if node in actor_nodes}
            rank = next(r for r in (1, 0) if hosts[r] not in actor_hosts)  # Ray Train's controller runs there
            victim = cluster.hosts[hosts[rank]]
            subprocess.run(["ip", "-n", victim.namespace, "link", "set", victim.interface, "down"], check=True)
            os.killpg(cluster.procs[victim.name].pid, signal.SIGKILL)
            seen.update(before=hosts, killed_rank=rank, killed_host=victim.name, actor_hosts=actor_hosts)
            break
        time.sleep(0.05)
    while not stop.is_set():  # the restarted worker group: new processes, alive, on which hosts
        _, after = _rank_hosts(store, cluster, exclude=set(pids.values()))
        if after:
            seen["after"] = after
            return
        time.sleep(0.05)


def test_a_two_host_training_trial_resumes_on_another_host_after_a_worker_host_is_lost(cluster: Cluster,
                                                                                        tmp_path: Path) -> None:
    """One Ray Train worker per worker host, checkpoints on storage every host mounts; a rank's host cut off
    mid-run. Ray Train restarts the worker group on the hosts left, a spare one included, from the checkpoint."""
    results, storage = tmp_path / "remote", tmp_path / "shared-storage"
    grid = tmp_path / "train.yaml"
    grid.write_text(yaml.safe_dump({
        "experiment": "train-2hosts", "kind": "training", "retries": 0,
        "base": {"workload": "lstm", "compressor": {"name": "a2sgd"}, "num_workers": 2, "max_failures": 2,
                 "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 300},
                 "optim": {"name": "sgd", "lr": 5.0, "clip": 0.25}, "steps": TRAIN_STEPS, "batch_size": 4,
                 "bptt": 8, "eval_every": TRAIN_STEPS, "eval_batches": 2, "checkpoint_every": TRAIN_EVERY,
                 "storage_path": str(storage), "seed": 0},
        "resources": {"num_cpus": 1, "pool": 1},  # per Train worker: at most one per worker host
    }))
    store = ExperimentStore(results, "train-2hosts")
    seen: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_take_a_rank_s_host_down, args=(cluster, store, storage, seen, stop),
                              daemon=True)
    killer.start()
    try:
        result = cluster.orch("submit", str(grid), "--address", cluster.jobs_address, "--remote-results",
                              str(results), timeout=300)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "killed_host" in seen, "no rank's host was ever cut off"
    before, after, lost = seen["before"], seen.get("after"), seen["killed_host"]
    assert len(set(before.values())) == 2 and set(before.values()) <= set(WORKERS), seen  # one rank per host
    (spare,) = set(WORKERS) - set(before.values())
    (survivor,) = set(before.values()) - {lost}
    assert lost not in seen["actor_hosts"]
    # The restarted group ran on the hosts left: the spare host took a rank, the lost host none, and the
    # rank whose host was lost resumed on another host.
    assert after is not None and set(after.values()) == {survivor, spare}, seen
    assert after[seen["killed_rank"]] != lost
    (entry,) = store.load_manifest()["trials"].values()
    assert entry["state"] == "done" and entry["attempts"] == 1  # Ray Train restarted it, not a trial retry
    summary = store.read_table("train_summary").to_pylist()[0]
    assert summary["restarts"] >= 1 and summary["num_workers"] == 2 and summary["steps"] == TRAIN_STEPS
    assert summary["resumed_from_step"] % TRAIN_EVERY == 0 and 0 < summary["resumed_from_step"] < TRAIN_STEPS
    steps = store.read_table("train_steps").to_pylist()
    for rank in (0, 1):  # no step lost, none duplicated: every step recorded once per rank
        assert sorted(r["step"] for r in steps if r["rank"] == rank) == list(range(1, TRAIN_STEPS + 1))
    assert {r["attempt"] for r in steps} >= {0, 1}


# Last in the module: it takes a worker host down for good (after the training test took another).
def test_a_grid_through_the_jobs_api_survives_a_worker_host_cut_off(cluster: Cluster, tmp_path: Path) -> None:
    results = tmp_path / "remote"
    node_ids = {name: node for name, node in cluster.node_ids().items() if name in WORKERS}
    assert len(node_ids) >= 2, f"needs two live worker hosts: {node_ids}"
    grid = write_grid(tmp_path, experiment="lose-host", grid={"x": [1, 2, 3, 4]}, base={"sleep_s": 4.0},
                      resources={"num_cpus": 1, "pool": 1}, retries=2)
    submit = subprocess.Popen([*ORCH, "submit", str(grid), "--address", cluster.jobs_address, "--remote-results",
                               str(results)], cwd=REPO, env=cluster.client_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    store = ExperimentStore(results, "lose-host")
    try:
        deadline = time.time() + 150
        while time.time() < deadline:  # both workers run a trial
            manifest = store.load_manifest() or {"trials": {}}
            running = [e for e in manifest["trials"].values() if e["state"] == "running" and e.get("start_s")]
            if len(running) >= 2:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the grid never ran two trials at once")
        time.sleep(1.5)  # inside their sleep now
        lost = next(name for name, node in node_ids.items() if node == running[0]["node"])
        host = cluster.hosts[lost]
        subprocess.run(["ip", "-n", host.namespace, "link", "set", host.interface, "down"], check=True)
        time.sleep(2.0)
        os.killpg(cluster.procs[lost].pid, signal.SIGKILL)  # the raylet and everything else on that host
        out, err = submit.communicate(timeout=240)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait(10)
    assert submit.returncode == 0, out[-3000:] + err[-3000:]
    entries = store.load_manifest()["trials"]
    assert sorted(e["state"] for e in entries.values()) == ["done"] * 4
    retried = [e for e in entries.values() if e["attempts"] > 1]
    assert retried, "a trial on the cut-off host must have been retried"
    assert all(e["node"] in set(node_ids.values()) - {node_ids[lost]} for e in retried)
    assert {e["node"] for e in entries.values()} <= set(node_ids.values())  # never on the head
    # nothing lost, nothing duplicated: one Parquet partition, one summary row and one MLflow run per trial
    ids = sorted(entries)
    assert parquet_trial_ids(results, "lose-host", "toy_summary") == ids
    summary = store.read_table("toy_summary").to_pandas()
    assert sorted(summary["trial_id"].astype(str)) == ids
    assert sorted(summary["score"]) == [10.0, 20.0, 30.0, 40.0]
    runs = mlflow_trial_runs(results, "lose-host")
    assert sorted(r.data.tags["orch.trial_id"] for r in runs) == ids
    assert all(r.info.status == "FINISHED" for r in runs)


TRAIN_STEPS, TRAIN_EVERY = 80, 20
