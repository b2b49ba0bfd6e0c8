"""Training over an emulated network: each worker a process in its own network namespace.

Ray Train's workers are Ray actors in the machine's own network namespace, so their gloo
traffic never crosses a shaped link. A trial with ``network: {...}`` therefore runs its
workers differently: the trial actor builds an ``EmulatedNetwork`` (backends/network) with one
host per worker, starts ``python -m workloads.training.emulated SPEC RANK`` inside each host
(``ip netns exec``), and the workers form their gloo group over the bridge (rank 0's address,
``GLOO_SOCKET_IFNAME=eth0``), so every collective crosses the shaped links. Each worker reads
its interface's byte counters around every step. The resources Ray reserved for the trial
(num_workers x per-worker resources) are what these processes use; all of them run on the
trial actor's host. Checkpoints are files under the trial's folder (``LocalEnv``), so a
restarted worker group (``max_failures``) and a retried trial resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backends.network import EmulatedNetwork, LinkShape
from workloads.training.params import TrainingParams

MASTER_PORT = 29500  # inside rank 0's namespace: nothing else listens there
POLL_S = 0.2
REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(net: EmulatedNetwork, spec: Path, log_dir: Path, attempt: int) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               GLOO_SOCKET_IFNAME=net.hosts[0].interface)
    procs = []
    for rank, host in enumerate(net.hosts):
        log = (log_dir / f"rank{rank}.attempt{attempt}.log").open("wb")
        procs.append(subprocess.Popen([*host.exec_args(), sys.executable, "-m", __name__, str(spec), str(rank)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT))
        log.close()
    return procs


def _wait(procs: list[subprocess.Popen[bytes]], net: EmulatedNetwork) -> int | None:
    """None when every worker succeeded, else the rank of the first that failed (others are killed);
    NetworkError (workers killed) when the network itself broke."""
    while True:
        try:
            net.check_links()
        except Exception:
            for p in procs:
                p.kill()
                p.wait()
            raise
        codes = [p.poll() for p in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return failed[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_S)


def fit_emulated(params: TrainingParams, workdir: Path, resources: dict[str, float]) -> list[dict[str, Any]]:
    """Train with one process per worker in shaped namespaces; returns each rank's final state."""
    from workloads.training.local import LocalEnv

    assert params.network is not None
    checkpoints, logs = workdir / "checkpoints", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shape = LinkShape(**params.network.model_dump())
    with EmulatedNetwork(params.num_workers, shape) as net:
        spec = workdir / "emulated.json"
        spec.write_text(json.dumps({
            "params": params.model_dump(mode="json"), "checkpoint_dir": str(checkpoints),
            "master": net.hosts[0].address, "interface": net.hosts[0].interface,
            "threads": max(1, int(resources.get("num_cpus", 1))), "workdir": str(workdir),
        }))
        for attempt in range(params.max_failures + 1):
            failed = _wait(_start(net, spec, logs, attempt), net)
            if failed is None:
                break
            if attempt == params.max_failures:
                tail = (logs / f"rank{failed}.attempt{attempt}.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"worker {failed} failed {attempt + 1} times; last: {tail[-1] if tail else '?'}")
    return [LocalEnv(rank, params.num_workers, checkpoints).load_state() for rank in range(params.num_workers)]


def main() -> None:
    """A worker inside its namespace: join the gloo group over the bridge and train."""
    import torch
    import torch.distributed as dist

    from workloads.training.local import LocalEnv
    from workloads.training.loop import record_pid, run_worker

    spec, rank = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2])
    params = TrainingParams.model_validate(spec["params"])
    record_pid(spec["workdir"], rank)
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}:{MASTER_PORT}", rank=rank,
                            world_size=params.num_workers)
    try:
        env = LocalEnv(rank, params.num_workers, Path(spec["checkpoint_dir"]), interface=spec["interface"])
        run_worker(params, env)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
