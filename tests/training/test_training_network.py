"""Training over an emulated network: wire bytes next to payload bytes, and nothing left after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workloads.kind import TrialContext
from workloads.training.kind import TrainingKind

ROOT = Path(__file__).resolve().parents[2]
TRIAL_NAMESPACES = "orchnet-*-[0-9]"  # a trial's hosts are its ranks (a test cluster's are named)
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"), pytest.mark.slow]


def _params(compressor: str, steps: int, latency_ms: float = 0.0) -> dict:
    return {
        "compressor": {"name": compressor}, "num_workers": 2,
        "network": {"bandwidth_gbit": 0.1, "latency_ms": latency_ms},
        "model": {"embed": 16, "hidden": 16, "layers": 1, "dropout": 0.0, "vocab_size": 300},
        "steps": steps, "batch_size": 4, "bptt": 8, "eval_every": 6, "eval_batches": 2, "seed": 0,
    }


def test_a2sgd_over_a_shaped_link_reports_wire_and_payload_bytes(tmp_path: Path) -> None:
    latency_ms = 5.0
    kind = TrainingKind()
    params = kind.params_model.model_validate(_params("a2sgd", 12, latency_ms))
    ctx = TrialContext(experiment="net", trial_id="t", repeat=0, attempt=1, workdir=tmp_path, resources={"num_cpus": 1})
    out = kind.run(None, params, ctx)
    steps = out.tables["train_steps"].to_pylist()
    assert len(steps) == 24 and {r["payload_bytes"] for r in steps} == {8}
    # Two fp32 scalars of payload; on the wire gloo's all-reduce messages, TCP/IP headers and ACKs.
    for row in steps:
        assert 8 < row["wire_bytes_sent"] < 20_000 and 8 < row["wire_bytes_recv"] < 20_000, row
    # The 8 bytes cross the link at least once per step: latency, not bandwidth, bounds the step.
    comm = sorted(r["comm_s"] for r in steps)
    assert comm[len(comm) // 2] >= latency_ms / 1000, comm
    summary = out.tables["train_summary"].to_pylist()[0]
    assert summary["wire_bytes_per_worker_step"] > summary["payload_bytes_per_worker_step"] == 8
    assert not list(Path("/run/netns").glob(TRIAL_NAMESPACES))


TRIAL = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from workloads.kind import TrialContext
from workloads.training.kind import TrainingKind
kind = TrainingKind()
params = kind.params_model.model_validate({params!r})
kind.run(None, params, TrialContext(experiment="k", trial_id="t", repeat=0, attempt=1,
                                    workdir=Path({workdir!r}), resources={{"num_cpus": 1}}))
"""


def test_a_trial_killed_mid_run_leaves_no_namespace_veth_qdisc_or_worker(tmp_path: Path) -> None:
    code = TRIAL.format(root=str(ROOT), params=_params("dense", 100_000), workdir=str(tmp_path))
    trial = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 180
    pid_files = []
    while time.time() < deadline and len(pid_files) < 2:
        pid_files = list((tmp_path / "pids").glob("rank*.pid"))
        time.sleep(0.2)
    assert len(pid_files) == 2, "the workers never started"
    while time.time() < deadline and not list((tmp_path / "checkpoints").glob("step_*")):
        time.sleep(0.2)  # training is under way
    namespaces = [p.name for p in Path("/run/netns").glob(TRIAL_NAMESPACES)]
    assert len(namespaces) == 2
    token = namespaces[0].split("-")[1]
    workers = [int(p.read_text()) for p in pid_files]
    trial.send_signal(signal.SIGKILL)
    trial.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(token in n for n in os.listdir("/sys/class/net")):
        time.sleep(0.1)
    assert not list(Path("/run/netns").glob(f"orchnet-{token}-*"))
    assert not [n for n in os.listdir("/sys/class/net") if token in n]  # veths and bridge
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert token not in qdiscs
    time.sleep(0.2)
    for pid in workers:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
