"""`ray up cluster.yaml` for real: Ray's cluster launcher over SSH to two namespace hosts.

Each host is a network namespace with its own address on a bridge, its own PID namespace (so the
`ray stop` that cluster.yaml and `ray down` run sees that host's processes only, not every Ray on
this machine), its own /tmp/ray and its own home (a folder bind-mounted on /root), and an sshd on port 22 of its
address that accepts one throwaway key. The config is the repository's cluster.yaml with the
test's addresses, user and key substituted and a trivial setup (the venv is on the filesystem
every namespace shares). The cycle is the user's: `orch token`, `ray up --yes`, `orch submit
--address`, `ray down --yes`; everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from backends.network import EmulatedNetwork
from backends.network.namespaces import Host, leftovers
from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.core.helpers import ORCH, write_grid

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() or not shutil.which("rsync"),
                       reason="needs openssh-server and rsync (the Makefile's APT_PACKAGES)"),
]

BIN = Path(sys.executable).parent
VENV = BIN.parent
SSHD_CONFIG = """\
ListenAddress {address}:22
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
"""
# Inside each host: a PID namespace with its own /proc, a private /tmp/ray, then sshd in the foreground.
# Its home on /root: OpenSSH's client takes `~` from the password database, not $HOME. The
# interpreter the venv points to may live under /root (pyenv): it is carried into that home.
HOST_INIT = ("mkdir -p /tmp/ray && mount -t tmpfs orch-host-tmp /tmp/ray && {carry}"
             "mount --rbind {home} /root && exec /usr/sbin/sshd -D -e -f {config}")


def _carry_interpreter(home: Path) -> str:
    """Shell commands that bind the base interpreter into ``home`` when it lives under /root."""
    base = Path(sys.base_prefix).resolve()
    if not base.is_relative_to("/root"):
        return ""
    inside = home / base.relative_to("/root")
    return f"mkdir -p {inside} && mount --bind {base} {inside} && "


def _start_host(host: Host, root: Path, user_key: Path) -> subprocess.Popen[bytes]:
    """sshd on ``host``'s address, port 22, in a PID and mount namespace of its own."""
    folder = root / host.name
    (folder / "home").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    shutil.copy(user_key.with_suffix(".pub"), folder / "authorized_keys")
    config = folder / "sshd_config"
    config.write_text(SSHD_CONFIG.format(address=host.address, folder=folder))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    return subprocess.Popen(
        [*host.exec_args(), "unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", HOST_INIT.format(home=folder / "home", config=config, carry=_carry_interpreter(folder / "home"))],
        stdout=(folder / "sshd.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _test_config(head: str, worker: str, key: Path, name: str) -> dict:
    """cluster.yaml with the test's addresses, root and its key, a trivial setup and one worker."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text().replace("10.0.0.10", head).replace("10.0.0.11", worker))
    config["cluster_name"] = name
    config["provider"]["worker_ips"] = [worker]
    config["max_workers"] = 1
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    chmod, path_in_bashrc = config["setup_commands"][1], config["setup_commands"][-1]
    config["setup_commands"] = [
        f"ln -sfn {VENV} ~/orch/.venv",  # the shared filesystem has the venv already (make setup builds it)
        chmod,
        path_in_bashrc,
        # The venv's `orch` is installed from /work/main's checkout; run the code under test instead.
        "grep -q PYTHONPATH ~/.bashrc || echo 'export PYTHONPATH=$HOME/orch' >> ~/.bashrc",
    ]
    return config


def _processes(host: Host) -> dict[int, str]:
    """pid -> command name of what runs in ``host``, except its sshd and the init wrapper."""
    listed = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True).stdout.split()
    found = {}
    for pid in map(int, listed):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name not in {"sshd", "sshd-session", "unshare", "sh"}:
            found[pid] = name
    return found


SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"]


def _head_logs(head: Host, key: Path) -> str:
    """The ends of the head's autoscaler logs (in its private /tmp/ray), read over SSH."""
    command = "tail -n 30 /tmp/ray/session_latest/logs/monitor.out /tmp/ray/session_latest/logs/monitor.err"
    return subprocess.run(["ssh", *SSH_OPTIONS, "-i", str(key), f"root@{head.address}", command],
                          capture_output=True, text=True, timeout=30).stdout


def _wait_for_no_processes(hosts: list[Host], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while left := {h.name: found for h in hosts if (found := _processes(h))}:
        assert time.time() < deadline, f"{what}: {left}"
        time.sleep(1)


def _alive_nodes(jobs_address: str, token: str) -> list[dict]:
    response = httpx.get(f"{jobs_address}/api/v0/nodes", params={"detail": "1"}, timeout=10,
                         headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return [n for n in response.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def test_ray_up_submit_and_ray_down_over_ssh(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="oru", dir="/tmp"))  # short paths: Ray's sockets live under HOME
    name = f"orch-test-{os.getpid()}"
    client_home = tmp_path / "client-home"
    client_env = dict(os.environ, HOME=str(client_home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ORCH_TOKENS_DIR", "ORCH_TOKEN_FILE",
                "RAY_ADDRESS"):
        client_env.pop(key, None)
    # Autoscaler v2 (`ray up`'s default since Ray 2.50) never launches the local provider's workers
    # here (monitor.log: "Adding 1 nodes" every 5 s, no launch): docs/cluster.md.
    client_env["RAY_UP_enable_autoscaler_v2"] = "0"
    try:
        with EmulatedNetwork(["head", "w1"], subnet="10.216.0.0/24", gateway=True) as net:
            head, worker = net.hosts
            user_key = root / "user_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True)
            sshds = [_start_host(host, root, user_key) for host in net.hosts]
            config = tmp_path / "cluster.yaml"
            config.write_text(yaml.safe_dump(_test_config(head.address, worker.address, user_key, name)))

            def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
                return subprocess.run(list(args), cwd=REPO, env=client_env, capture_output=True, text=True,
                                      timeout=timeout)

            made = run(*ORCH, "token", head.address)
            assert made.returncode == 0, made.stderr
            token = (client_home / ".orch" / "tokens" / head.address).read_text().strip()
            up = run(str(BIN / "ray"), "up", str(config), "--yes", "--no-config-cache", timeout=300)
            assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
            jobs_address = f"http://{head.address}:8265"
            deadline = time.time() + 120  # the head's autoscaler brings the worker up over SSH
            while len(nodes := _alive_nodes(jobs_address, token)) < 2:
                assert time.time() < deadline, f"the worker never joined: {nodes}\n{_head_logs(head, user_key)}"
                time.sleep(2)
            by_ip = {n["node_ip"]: n for n in nodes}
            assert by_ip[worker.address]["resources_total"].get("cpu_node") == 1
            assert by_ip[head.address]["resources_total"].get("head") == 1
            assert "CPU" not in by_ip[head.address]["resources_total"]  # trials stay off the head

            results = root / "results"
            grid = write_grid(tmp_path, experiment="ray-up", grid={"x": [1, 2]},
                              resources={"num_cpus": 1, "cpu_node": 1})
            submitted = run(*ORCH, "submit", str(grid), "--address", jobs_address, "--remote-results", str(results))
            assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
            entries = ExperimentStore(results, "ray-up").load_manifest()["trials"]
            assert sorted(e["state"] for e in entries.values()) == ["done", "done"]
            assert {e["node"] for e in entries.values()} == {by_ip[worker.address]["node_id"]}

            down = run(str(BIN / "ray"), "down", str(config), "--yes", timeout=120)
            assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
            _wait_for_no_processes([head], 20, "`ray down` left processes on the head")
            # Ray's `ray down` runs `ray stop` on the head only; the local provider merely marks the
            # workers terminated. docs/cluster.md: stop Ray on each worker as below.
            stopped = run("ssh", *SSH_OPTIONS, "-i", str(user_key), f"root@{worker.address}",
                          "~/orch/.venv/bin/ray stop", timeout=60)
            assert stopped.returncode == 0, stopped.stderr
            _wait_for_no_processes(net.hosts, 30, "Ray processes left after `ray down` and the workers' `ray stop`")
            assert all(sshd.poll() is None for sshd in sshds)  # only Ray went away
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for state in Path("/tmp/ray").glob(f"cluster-{name}.*"):  # the local provider's node state on this side
            state.unlink(missing_ok=True)
        for cache in Path("/tmp").glob("ray-config-*"):  # `ray down`'s cached copy of this config
            if name in cache.read_text(errors="replace"):
                cache.unlink(missing_ok=True)
    assert not leftovers(net.token), "the namespace hosts were not torn down"
