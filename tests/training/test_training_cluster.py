"""Training trials and the cluster: loopback-only sockets on one host, shared storage across nodes."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from workloads.kind import TrialContext
from workloads.training.kind import TrainingKind
from workloads.training.params import TrainingParams

LISTEN = "0A"


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} 'ADDR:PORT' (host byte order words) -> the IP address."""
    raw = bytes.fromhex(hex_address.split(":")[0])
    words = b"".join(struct.pack("=I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d is IPv4's a.b.c.d
    return str(mapped or address)


def listening_addresses(pid: int) -> set[str]:
    """The local addresses of the TCP sockets process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found


def test_proc_net_addresses_decode() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_addresses(os.getpid()) >= {"127.0.0.1"}


@pytest.fixture
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def _watch(workdir: Path, seen: dict[int, set[str]], stop: threading.Event) -> None:
    while not stop.is_set():
        for pid_file in (workdir / "pids").glob("rank*.pid"):
            pid = int(pid_file.read_text())
            try:
                seen.setdefault(pid, set()).update(listening_addresses(pid))
            except OSError:  # the worker just ended
                pass
        time.sleep(0.1)


@pytest.mark.slow
def test_a_training_trial_on_the_embedded_cluster_listens_on_loopback_only(local_ray, tmp_path: Path) -> None:
    kind = TrainingKind()
    storage = tmp_path / "shared"
    params = kind.params_model.model_validate(
        {
            "compressor": {"name": "dense"}, "num_workers": 2, "storage_path": str(storage),
            "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 300},
            "steps": 60, "batch_size": 4, "bptt": 8, "eval_every": 30, "eval_batches": 2, "seed": 0,
        }
    )
    workdir = tmp_path / "trial"
    ctx = TrialContext(experiment="lo", trial_id="t1", repeat=0, attempt=1, workdir=workdir, resources={"num_cpus": 1},
                       code_version="0123456789abcdef-dirty")
    seen: dict[int, set[str]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(workdir, seen, stop), daemon=True)
    watcher.start()
    try:
        out = kind.run(None, params, ctx)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert out.tables["train_summary"].to_pylist()[0]["steps"] == 60
    assert len(seen) == 2, seen
    addresses = set().union(*seen.values())
    assert addresses, "the workers listened on nothing: the test would prove nothing"
    assert addresses <= {"127.0.0.1", "::1"}, addresses
    # Checkpoints went to the storage path given, one run per trial and code version.
    assert list((storage / "lo.t1.0123456789ab-dirty").glob("checkpoint_*")), list(storage.rglob("*"))[:10]
    assert not (workdir / "ray_train").exists()


def test_storage_is_needed_on_several_nodes_only() -> None:
    kind = TrainingKind()
    params = TrainingParams.model_validate({"steps": 1})
    kind.check_cluster(params, [{"CPU": 2}])
    with pytest.raises(ValueError, match="storage_path"):
        kind.check_cluster(params, [{"CPU": 2}, {"CPU": 2}])
    kind.check_cluster(TrainingParams.model_validate({"steps": 1, "storage_path": "s3://bucket/runs"}), [{}, {}])
    with pytest.raises(ValueError, match="absolute path"):
        TrainingParams.model_validate({"steps": 1, "storage_path": "shared/runs"})


def test_what_the_host_must_offer_is_checked_only_where_the_driver_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Jobs API submit checks the cluster's shape on the submitting machine; a network trial's
    needs (root, tc, netem) are those of the head, where its driver checks them."""
    import backends.network

    def unsupported(shape):
        raise backends.network.NetworkError("needs root")

    monkeypatch.setattr(backends.network, "check_support", unsupported)
    kind = TrainingKind()
    params = TrainingParams.model_validate({"steps": 1, "network": {"latency_ms": 5.0}})
    kind.check_cluster(params, [{"CPU": 2}, {"CPU": 2}])  # network trials need no shared storage either
    with pytest.raises(ValueError, match="network: needs root"):
        kind.check_host(params)
    kind.check_host(TrainingParams.model_validate({"steps": 1}))


@pytest.mark.slow
def test_submitting_training_to_two_nodes_without_storage_is_refused(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        grid = tmp_path / "grid.yaml"
        grid.write_text(yaml.safe_dump({"experiment": "multi", "kind": "training", "base": {"steps": 2},
                                        "resources": {"num_cpus": 1}}))
        result = CliRunner().invoke(main, ["submit", str(grid), "--results", str(tmp_path / "r"),
                                           "--address", cluster.address])
        assert result.exit_code == 2, result.output
        assert "storage_path" in result.output and "2 nodes" in result.output
    finally:
        ray.shutdown()
        cluster.shutdown()
