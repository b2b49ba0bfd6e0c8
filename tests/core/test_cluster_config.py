"""cluster.yaml: valid for Ray's cluster launcher, and safe by default (token, private dashboard, no trials on the head)."""

from __future__ import annotations

import ipaddress
import re

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
    assert "$(SUDO) apt-get update" in makefile and "$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get" in makefile
