"""The offline install set (scripts/wheelhouse.py, scripts/install_offline.sh) on this machine.

Re-packed wheels must carry a RECORD that matches their files, Ray's slimming must drop what it
says and keep binaries runnable, and the whole set must install with no index into a venv that
holds only a GPU host's packages (scripts/host_sim.py) and run orch, Ray and MLflow's SQLite store.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheelhouse = _load("wheelhouse")


def _record_mismatches(wheel: Path) -> list[str]:
    """Members whose RECORD hash or size is wrong, plus members RECORD misses."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        (record_name,) = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
        rows = {row[0]: row for row in csv.reader(io.StringIO(archive.read(record_name).decode()))}
        bad = [n for n in names if n not in rows]
        for name, (_, digest, size) in ((n, rows[n]) for n in names if n in rows and n != record_name):
            data = archive.read(name)
            expected = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if digest != expected or int(size) != len(data):
                bad.append(name)
    return bad


def _fake_ray_wheel(tmp_path: Path) -> Path:
    """A small wheel laid out like Ray's, with a real (unstripped-able) shared library as _raylet.so."""
    native = Path(sysconfig.get_config_var("LIBDEST")) / "lib-dynload"
    library = min(native.glob("_struct*.so"), key=lambda p: p.stat().st_size)
    files = {
        "ray/__init__.py": b"x = 1\n",
        "ray/_raylet.so": library.read_bytes(),
        "ray/jars/ray_dist.jar": b"jar" * 100,
        "ray/rllib/__init__.py": b"",
        "ray/dashboard/client/build/index.html": b"<html/>",
        "ray/dashboard/modules/app.js.map": b"{}",
        "ray/dashboard/modules/head.py": b"y = 2\n",
        "ray-2.60.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n",
        "ray-2.60.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 2.60.0\n",
    }
    wheel = tmp_path / "ray-2.60.0-cp311-cp311-linux_x86_64.whl"
    wheelhouse.write_wheel(wheel, files, "ray-2.60.0.dist-info", {"ray/_raylet.so"})
    return wheel


@pytest.mark.skipif(shutil.which("strip") is None, reason="needs binutils' strip")
def test_slimmed_ray_wheel_keeps_a_valid_record_and_drops_what_nodes_never_run(tmp_path: Path) -> None:
    wheel = _fake_ray_wheel(tmp_path)
    files, executables = wheelhouse.read_wheel(wheel)
    slim = wheelhouse.slim_ray(files)
    out = tmp_path / "slim.whl"
    wheelhouse.write_wheel(out, slim, "ray-2.60.0.dist-info", executables, stored=True)

    assert _record_mismatches(wheel) == [] and _record_mismatches(out) == []
    with zipfile.ZipFile(out) as archive:
        names = set(archive.namelist())
        raylet = archive.getinfo("ray/_raylet.so")
        assert raylet.compress_type == zipfile.ZIP_STORED
        assert (raylet.external_attr >> 16) & 0o111  # pip restores the executable bit from this
    assert {"ray/__init__.py", "ray/dashboard/modules/head.py", "ray/_raylet.so"} <= names
    assert not {n for n in names if n.startswith(("ray/jars/", "ray/rllib/", "ray/dashboard/client/"))}
    assert not {n for n in names if n.endswith(".map")}
    assert len(slim["ray/_raylet.so"]) < len(files["ray/_raylet.so"])  # debug symbols gone


def test_target_platforms_include_older_manylinux_tags() -> None:
    tags = wheelhouse.target_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert wheelhouse.target_platforms("linux_x86_64") == ["linux_x86_64"]


@pytest.mark.slow
def test_wheelhouse_installs_offline_beside_the_hosts_torch_and_runs_orch(tmp_path: Path) -> None:
    # Build from this venv's installed files (no network), for this machine's platform and Python.
    house = tmp_path / "wheelhouse"
    build = subprocess.run([sys.executable, str(SCRIPTS / "wheelhouse.py"), "--out", str(house)],
                           capture_output=True, text=True, cwd=REPO)
    assert build.returncode == 0, build.stderr
    wheels = {w.name.split("-", 1)[0].lower() for w in house.glob("*.whl")}
    carried = {wheelhouse.canonical(n).replace("-", "_") for n in wheelhouse.read_packages(wheelhouse.DEFAULT_PACKAGES)}
    assert wheels == carried | {"orch"}
    assert "torch" not in wheels and "mlflow" not in wheels  # the host's torch; the skinny client
    (ray_wheel,) = house.glob("ray-*.whl")
    assert _record_mismatches(ray_wheel) == []

    # A venv with only the GPU host's packages (symlinked from this venv), then the offline install.
    venv = tmp_path / "host"
    subprocess.run([sys.executable, str(SCRIPTS / "host_sim.py"), str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = tmp_path / "site"
    env = {**os.environ, "PYTHON": str(python), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    env.pop("PYTHONPATH", None)
    subprocess.run(["bash", str(SCRIPTS / "install_offline.sh"), str(house), str(site)], check=True, env=env,
                   capture_output=True)

    run_env = {**env, "PYTHONPATH": str(site), "RAY_USAGE_STATS_ENABLED": "0"}
    probe = subprocess.run(
        [str(python), "-c",
         "import ray, mlflow, torch, orchestrator; print(ray.__file__); print(torch.__file__); "
         "print(orchestrator.__file__); "
         "from mlflow.tracking import MlflowClient; import sys; "
         "c = MlflowClient(tracking_uri='sqlite:///' + sys.argv[1]); print(c.create_experiment('x'))",
         str(tmp_path / "mlflow.db")],
        capture_output=True, text=True, env=run_env, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    ray_file, torch_file, orch_file, experiment_id = probe.stdout.split()[-4:]
    assert ray_file.startswith(str(site)) and orch_file.startswith(str(site))
    assert str(site) not in torch_file  # torch is the host's
    assert experiment_id.isdigit() and (tmp_path / "mlflow.db").stat().st_size > 0

    validate = subprocess.run([str(site / "bin" / "orch"), "validate", str(REPO / "grids" / "quickstart-training.yaml")],
                              capture_output=True, text=True, env=run_env, cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "a2sgd" in validate.stdout and "powersgd" in validate.stdout
