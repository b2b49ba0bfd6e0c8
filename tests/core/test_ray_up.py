"""`ray up cluster.yaml` for real: Ray's cluster launcher over SSH to two namespace hosts, as a normal user.

Each host is a network namespace with its own address on a bridge, its own PID namespace (so the
`ray stop` that cluster.yaml and `ray down` run sees that host's processes only, not every Ray on
this machine), its own /tmp/ray, and an sshd on port 22 of its address that accepts one throwaway
key. `ray up` logs in as a non-root user made for the test (passwordless sudo, like a cloud
image's default user), whose home is a folder of each host's own. The config is the repository's
cluster.yaml with the test's addresses, user and key substituted, and its own setup_commands: the
Python check, `make setup` (through sudo when packages are missing), the PATH line. The nodes' venv
is already there (the shared filesystem has one; building it takes minutes), so `make setup` takes
its idempotent path; the sudo apt-get path is then taken on a node over SSH. The cycle is the
user's: `orch token`, `ray up --yes`, `orch submit --address`, `ray down --yes`; everything is torn
down at the end, also on failure (namespaces, sshd, Ray, the user and its sudoers file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
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
PermitRootLogin no
StrictModes no
UsePAM no
"""
# Inside each host: a PID namespace with its own /proc, a private /tmp/ray, the SSH user's home of
# this host on the path the password database names (OpenSSH takes `~` from there, not $HOME), then
# sshd in the foreground. The interpreter the venv points to may live under /root (pyenv, mode 700):
# a folder open to the user replaces /root and carries it.
HOST_INIT = ("mkdir -p /tmp/ray && mount -t tmpfs orch-host-tmp /tmp/ray && {carry}"
             "mount --rbind {root_home} /root && mount --bind {user_home} {home} && "
             "exec /usr/sbin/sshd -D -e -f {config}")
USER_PREFIX = "orch-up-"
SUDOERS = Path("/etc/sudoers.d")


def _remove_user(name: str) -> None:
    """The user, its sudoers file, and what its processes left in /tmp (Ray's SSH control folders,
    multiprocessing's temporary folders): its uid may go to the next test's user."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    subprocess.run(["userdel", name], capture_output=True)
    (SUDOERS / name).unlink(missing_ok=True)
    for entry in _tmp_entries_of(uid) if uid is not None else ():
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _ssh_control_folders(cluster: str) -> list[Path]:
    """`ray up`'s SSH control folders of ``cluster`` on this side (/tmp/ray_ssh_<user>/<cluster hash>)."""
    return list(Path("/tmp").glob(f"ray_ssh_*/{hashlib.sha256(cluster.encode()).hexdigest()[:10]}"))


def _tmp_entries_of(uid: int) -> list[Path]:
    """The entries of /tmp that ``uid`` owns (others' may come and go meanwhile)."""
    owned = []
    for entry in Path("/tmp").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if entry.lstat().st_uid == uid:
                owned.append(entry)
    return owned


def _add_user(name: str, home: Path) -> None:
    """A normal user with passwordless sudo; its home (``home``) is each host's own folder."""
    for line in Path("/etc/passwd").read_text().splitlines():  # left by a test process that was killed
        stale = line.split(":")[0]
        if stale.startswith(USER_PREFIX) and stale[len(USER_PREFIX):].isdigit():
            try:
                os.kill(int(stale[len(USER_PREFIX):]), 0)
            except ProcessLookupError:
                _remove_user(stale)
    # '*': no password, yet not locked (sshd refuses a locked account's key without PAM)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                    "--password", "*", name], check=True)
    sudoers = SUDOERS / name
    sudoers.write_text(f"{name} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)


def _provision_venv(orch: Path) -> None:
    """``orch``/.venv as `make setup` leaves it: the shared venv's parts and a stamp newer than pyproject.toml."""
    venv = orch / ".venv"
    venv.mkdir(parents=True)
    for part in ("bin", "lib", "include", "pyvenv.cfg"):
        if (VENV / part).exists():
            (venv / part).symlink_to(VENV / part)
    (venv / ".installed").touch()


def _carry_interpreter(home: Path) -> str:
    """Shell commands that bind the base interpreter into ``home`` when it lives under /root."""
    base = Path(sys.base_prefix).resolve()
    if not base.is_relative_to("/root"):
        return ""
    inside = home / base.relative_to("/root")
    return f"mkdir -p {inside} && mount --bind {base} {inside} && "


def _start_host(host: Host, root: Path, user_key: Path, user: str) -> subprocess.Popen[bytes]:
    """sshd on ``host``'s address, port 22, in a PID and mount namespace of its own; ``user``'s home prepared."""
    folder = root / host.name
    (folder / "home").mkdir(parents=True)
    _provision_venv(folder / "user" / "orch")
    subprocess.run(["chown", "-R", "-h", f"{user}:", str(folder / "user")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    shutil.copy(user_key.with_suffix(".pub"), folder / "authorized_keys")
    config = folder / "sshd_config"
    config.write_text(SSHD_CONFIG.format(address=host.address, folder=folder))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    return subprocess.Popen(
        [*host.exec_args(), "unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
         HOST_INIT.format(root_home=folder / "home", user_home=folder / "user", home=root / "home", config=config,
                          carry=_carry_interpreter(folder / "home"))],
        stdout=(folder / "sshd.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _test_config(head: str, worker: str, key: Path, name: str, user: str) -> dict:
    """cluster.yaml with the test's addresses, user and key, one worker, and its own setup plus one line."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text().replace("10.0.0.10", head).replace("10.0.0.11", worker))
    config["cluster_name"] = name
    config["provider"]["worker_ips"] = [worker]
    config["max_workers"] = 1
    config["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    # The venv's `orch` is installed from another checkout of this repository: run the code under test.
    config["setup_commands"].append("grep -q PYTHONPATH ~/.bashrc || echo 'export PYTHONPATH=$HOME/orch' >> ~/.bashrc")
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


def _ssh(user: str, host: Host, key: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", *SSH_OPTIONS, "-i", str(key), f"{user}@{host.address}", command],
                          capture_output=True, text=True, timeout=timeout)


def _head_logs(head: Host, key: Path, user: str) -> str:
    """The ends of the head's autoscaler logs (in its private /tmp/ray), read over SSH."""
    return _ssh(user, head, key, "tail -n 30 /tmp/ray/session_latest/logs/monitor.out "
                                 "/tmp/ray/session_latest/logs/monitor.err", timeout=30).stdout


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


def test_ray_up_submit_and_ray_down_over_ssh_as_a_normal_user(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="oru", dir="/tmp"))  # short paths: Ray's sockets live under HOME
    root.chmod(0o755)  # the SSH user reaches its home, the keys sshd reads as that user, the results
    name, user = f"orch-test-{os.getpid()}", f"{USER_PREFIX}{os.getpid()}"
    client_home = tmp_path / "client-home"
    client_env = dict(os.environ, HOME=str(client_home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ORCH_TOKENS_DIR", "ORCH_TOKEN_FILE",
                "RAY_ADDRESS"):
        client_env.pop(key, None)
    # Autoscaler v2 (`ray up`'s default since Ray 2.50) never launches the local provider's workers
    # here (monitor.log: "Adding 1 nodes" every 5 s, no launch): docs/cluster.md.
    client_env["RAY_UP_enable_autoscaler_v2"] = "0"
    try:
        (root / "home").mkdir()  # where each host mounts its own home of the user
        _add_user(user, root / "home")
        with EmulatedNetwork(["head", "w1"], subnet="10.216.0.0/24", gateway=True) as net:
            head, worker = net.hosts
            user_key = root / "user_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True)
            sshds = [_start_host(host, root, user_key, user) for host in net.hosts]
            stamp_times = {h.name: (root / h.name / "user/orch/.venv/.installed").stat().st_mtime for h in net.hosts}
            config = tmp_path / "cluster.yaml"
            config.write_text(yaml.safe_dump(_test_config(head.address, worker.address, user_key, name, user)))

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
                assert time.time() < deadline, f"the worker never joined: {nodes}\n{_head_logs(head, user_key, user)}"
                time.sleep(2)
            by_ip = {n["node_ip"]: n for n in nodes}
            assert by_ip[worker.address]["resources_total"].get("cpu_node") == 1
            assert by_ip[head.address]["resources_total"].get("head") == 1
            assert "CPU" not in by_ip[head.address]["resources_total"]  # trials stay off the head
            uid = pwd.getpwnam(user).pw_uid
            for host in net.hosts:  # cluster.yaml's setup ran to its end, as the user, on both hosts
                home = root / host.name / "user"
                assert "orch/.venv/bin" in (home / ".bashrc").read_text()
                assert (home / "orch" / "Makefile").stat().st_uid == uid
                assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
                # `make setup` took its idempotent path: the venv was found installed, not rebuilt
                assert (home / "orch/.venv/.installed").stat().st_mtime == stamp_times[host.name]
            ray_pids = [pid for pid, comm in _processes(head).items() if comm.startswith(("raylet", "gcs_server"))]
            assert ray_pids and all(Path(f"/proc/{pid}").stat().st_uid == uid for pid in ray_pids)

            # The sudo path of `make setup` on a node, which the installed packages skipped above: the
            # check is told two installed packages are missing, so apt-get runs through `sudo -n` (as
            # root: it takes dpkg's lock) and finds them installed (--no-upgrade: nothing to download).
            apt = _ssh(user, worker, user_key, "cd ~/orch && make -s system-deps APT_MISSING='openssh-server rsync'")
            assert apt.returncode == 0, apt.stdout + apt.stderr
            without_sudo = _ssh(user, worker, user_key, "cd ~/orch && make -s system-deps APT_MISSING=rsync SUDO=")
            assert without_sudo.returncode != 0 and "lock" in without_sudo.stderr  # apt-get needs root

            results = root / "results"
            results.mkdir()
            os.chown(results, uid, -1)  # the driver runs on the head as the user
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
            stopped = _ssh(user, worker, user_key, "~/orch/.venv/bin/ray stop")
            assert stopped.returncode == 0, stopped.stderr
            _wait_for_no_processes(net.hosts, 30, "Ray processes left after `ray down` and the workers' `ray stop`")
            assert all(sshd.poll() is None for sshd in sshds)  # only Ray went away
    finally:
        _remove_user(user)  # after the network: its processes are gone
        shutil.rmtree(root, ignore_errors=True)
        for state in Path("/tmp/ray").glob(f"cluster-{name}.*"):  # the local provider's node state on this side
            state.unlink(missing_ok=True)
        for control in _ssh_control_folders(name):
            shutil.rmtree(control, ignore_errors=True)
            with contextlib.suppress(OSError):
                control.parent.rmdir()  # when no other cluster's folder is left in it
        for cache in Path("/tmp").glob("ray-config-*"):  # `ray down`'s cached copy of this config
            if name in cache.read_text(errors="replace"):
                cache.unlink(missing_ok=True)
    assert not leftovers(net.token), "the namespace hosts were not torn down"
    assert user not in {entry.pw_name for entry in pwd.getpwall()} and not (SUDOERS / user).exists()
    assert not _ssh_control_folders(name)
    assert not _tmp_entries_of(uid)  # nor what the user's processes left in /tmp
