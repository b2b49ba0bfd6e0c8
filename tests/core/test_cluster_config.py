"""cluster.yaml: valid for Ray's cluster launcher, and safe by default (token, private dashboard, no trials on the head)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

VENV_RAY = "$HOME/orch/.venv/bin/ray"


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_s_own_validation() -> None:
    config = prepare_config(_config())
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert config["auth"]["ssh_user"] != "root" and config["auth"]["ssh_private_key"]


def test_cluster_yaml_is_safe_by_default() -> None:
    config = _config()
    head_ip = config["provider"]["head_ip"]
    assert ipaddress.ip_address(head_ip).is_private
    # one token, generated once on the submitter's machine (orch token HEAD), shipped to every node
    assert config["file_mounts"]["~/.ray/auth_token"] == f"~/.orch/tokens/{head_ip}"
    head_start = config["head_start_ray_commands"][-1]
    worker_start = config["worker_start_ray_commands"][-1]
    for command in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in command and f"{VENV_RAY} start" in command
    # the dashboard and Jobs API on the head's private address, never 0.0.0.0
    assert re.search(rf"--dashboard-host={re.escape(head_ip)}\b", head_start) and "0.0.0.0" not in head_start
    assert "--num-cpus=0" in head_start and "--num-gpus=0" in head_start  # trials stay off the head
    # stop commands call Ray by its full path in the venv; setup checks Python and uses no bare apt-get
    assert config["head_start_ray_commands"][0] == f"{VENV_RAY} stop"
    assert config["worker_start_ray_commands"][0] == f"{VENV_RAY} stop"
    setup = "\n".join(config["setup_commands"])
    assert "sys.version_info[:2] == (3, 11)" in setup and "make setup" in setup
    makefile = (REPO / "Makefile").read_text()  # a non-root SSH user's `make setup` reaches apt-get through sudo
    assert "$(SUDO) apt-get update" in makefile and "APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive" in makefile
    assert 'echo sudo -n)' in makefile  # never a password prompt that `ray up` cannot answer


def _python_check() -> str:
    (command,) = [c for c in _config()["setup_commands"] if "sys.version_info" in c]
    return command


def test_setup_stops_with_one_line_on_a_node_without_python_3_11(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-c", _python_check()], capture_output=True, text=True).returncode == 0
    bare = tmp_path / "bin"  # a node's PATH with no python3.11 on it
    bare.mkdir()
    (bare / "hostname").symlink_to(shutil.which("hostname"))
    result = subprocess.run(["/bin/bash", "-c", _python_check()], env={"PATH": str(bare)}, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"orch needs Python 3.11 with venv on {socket.gethostname()}: sudo apt-get install -y python3.11 python3.11-venv"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs make as another user")
def test_setup_as_a_user_without_sudo_names_the_missing_packages() -> None:
    """`make setup`'s package step as a normal user who cannot sudo: one line, no password prompt."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # pytest's tmp_path is closed to other users
        Path(folder).chmod(0o755)
        shutil.copy(REPO / "Makefile", Path(folder) / "Makefile")

        def system_deps(missing: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", "nobody", "--", "make", "-s", "-C", folder, "system-deps",
                                   f"APT_MISSING={missing}"], capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)

        refused = system_deps("rsync openssh-server")
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[0] == ("make setup: nobody is not root and cannot sudo without a password; "
                                                  "install these Debian packages first: rsync openssh-server")
        done = system_deps("")  # nothing missing: no sudo needed at all
        assert done.returncode == 0 and not done.stderr


# Tracked top-level entries the nodes never use: they stay on the submitting machine.
LOCAL_ONLY = {".ci", ".gitignore", "README.md", "cluster.yaml", "docs"}


def test_file_mounts_ship_the_project_but_never_a_folder_holding_the_venvs() -> None:
    """Ray hashes every file under a mount at each `ray up`: a mount of the checkout would read its venvs."""
    mounts = _config()["file_mounts"]
    project = {remote.removeprefix("~/orch/"): local for remote, local in mounts.items() if remote.startswith("~/orch")}
    assert all(remote == local for remote, local in project.items()), project  # each entry in its own place
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    top_level = {path.split("/", 1)[0] for path in tracked.splitlines()}
    # every tracked entry either shipped or named as local-only: a new folder is a decision, not an omission
    assert set(project) == top_level - LOCAL_ONLY, sorted(top_level ^ (set(project) | LOCAL_ONLY))
    for local in mounts.values():  # no mount contains the venvs, the results or .git
        assert not {".venv", ".venv-vllm", "results", ".git"} & {p.name for p in (REPO / local).glob("*")}
