"""Grid scaling: one serving grid submitted on 1, 2 and 4 GPUs (or CPU slots) of one host.

Each slot count gets a fresh embedded Ray that sees exactly that many slots (GPUs: the first k
devices, through ``CUDA_VISIBLE_DEVICES`` and Ray's ``num_gpus``; CPU: Ray's ``num_cpus``); every
trial asks for one slot, and the same grid runs through ``Submission`` with Parquet and MLflow as
``orch submit`` runs it. Measured per slot count: trials per hour over the submission's wall time
(Ray's start excluded, actor start-up and engine loads included), the speed-up over one slot
measured in the same run, its ratio to linear (goal >= 0.9x), how busy the slots were (trial
time / (slots x wall)) and the peak number of trials running at once.

Run: ``python -m benchmarks.bench_grid_scaling`` (GPUs: ``--device cuda --slots 1,2,4``, grid
``grids/kv-study-1gpu.yaml``; without a GPU the reduced form ``--device cpu --slots 1,2`` on
``grids/kv-scaling-cpu.yaml``). ``--results DIR`` keeps the Parquet datasets and MLflow store
(experiments ``<experiment>-<k><unit>``); ``--json FILE`` writes the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from orchestrator.cluster import ClusterOptions, connect, disconnect, set_ray_env
from orchestrator.expand import expand
from orchestrator.manifest import Manifest
from orchestrator.scheduler import Submission
from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.store import ExperimentStore
from orchestrator.tracking import Tracker
from workloads.registry import resolve_kind

Device = Literal["cpu", "cuda"]
GOAL = 0.9
DEFAULT_GRID = {"cuda": "grids/kv-study-1gpu.yaml", "cpu": "grids/kv-scaling-cpu.yaml"}
DEFAULT_SLOTS = {"cuda": "1,2,4", "cpu": "1,2"}
UNIT = {"cuda": "gpu", "cpu": "cpu"}


@dataclass(frozen=True)
class ScalingRun:
    """One submission of the grid on ``slots`` slots."""

    slots: int
    trials: int
    done: int
    wall_s: float
    busy_s: float  # sum of the trials' own durations (manifest start..end)
    peak_running: int  # most trials running at one time

    @property
    def trials_per_hour(self) -> float:
        """Finished trials per hour of the submission's wall time."""
        return self.done * 3600.0 / self.wall_s

    @property
    def utilisation(self) -> float:
        """Fraction of slot time spent inside trials."""
        return self.busy_s / (self.slots * self.wall_s)


def speedups(runs: list[ScalingRun]) -> list[tuple[ScalingRun, float, float]]:
    """(run, speed-up over the one-slot run, speed-up / slots) for each run; the first run is the baseline."""
    base = runs[0]
    out = []
    for run in runs:
        speedup = (run.trials_per_hour / base.trials_per_hour) * base.slots
        out.append((run, speedup, speedup / run.slots))
    return out


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one instant (an interval ending where another starts does not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def one_slot_per_trial(data: dict[str, Any], device: Device) -> dict[str, Any]:
    """The grid with every trial asking for exactly one slot (one GPU, or one CPU), under a name per device."""
    resources = dict(data.get("resources") or {})
    if device == "cuda":
        resources["num_gpus"] = 1
    else:
        resources.pop("num_gpus", None)
        resources["num_cpus"] = 1
    return {**data, "resources": resources}


def run_at(data: dict[str, Any], slots: int, device: Device, root: Path, visible: list[str]) -> ScalingRun:
    """Submit the grid on a fresh embedded Ray offering ``slots`` slots (the first of the ``visible``
    GPUs on cuda); the measured run."""
    data = {**data, "experiment": f"{data['experiment']}-{slots}{UNIT[device]}"}
    spec = parse_spec(data, source=data["experiment"])
    kind = resolve_kind(spec.kind)
    trials = expand(spec, kind)
    store = ExperimentStore(root, spec.experiment)
    if device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:slots])
        options = ClusterOptions(dashboard=False, num_gpus=slots)
    else:
        options = ClusterOptions(dashboard=False, num_cpus=slots, num_gpus=0)
    connect(options)
    try:
        tracker = Tracker(store)
        start = time.perf_counter()
        outcome = Submission(spec, kind, trials, store, tracker).run()
        wall = time.perf_counter() - start
    finally:
        disconnect()
    manifest = Manifest.load(store)
    assert manifest is not None
    intervals = [(e["start_s"], e["end_s"]) for e in manifest.trials.values()
                 if e.get("state") == "done" and e.get("start_s") is not None and e.get("end_s") is not None]
    return ScalingRun(slots=slots, trials=len(trials), done=outcome.counts.get("done", 0), wall_s=wall,
                      busy_s=sum(end - start for start, end in intervals), peak_running=peak_concurrency(intervals))


def measure(data: dict[str, Any], slot_counts: list[int], device: Device, root: Path) -> list[ScalingRun]:
    """The grid at each slot count, in order (the first is the baseline of the ratios)."""
    set_ray_env()
    # Ray's workers import this checkout (benchmarks may name test kinds by import path).
    repo = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [repo, os.environ.get("PYTHONPATH", "")] if p)
    data = one_slot_per_trial(data, device)
    # The GPUs this process was given (a scheduler may have set CUDA_VISIBLE_DEVICES already).
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = given.split(",") if given else [str(i) for i in range(max(slot_counts))]
    try:
        return [run_at(data, slots, device, root, visible) for slots in slot_counts]
    finally:
        if given is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = given


def table(runs: list[ScalingRun]) -> list[str]:
    """The printed result: one line per slot count, then the goal."""
    lines = ["| slots | trials done | wall (s) | trials/hour | speed-up | vs linear | slots busy | peak running |",
             "|---|---|---|---|---|---|---|---|"]
    for run, speedup, ratio in speedups(runs):
        lines.append(f"| {run.slots} | {run.done}/{run.trials} | {run.wall_s:.1f} | {run.trials_per_hour:.0f} | "
                     f"{speedup:.2f}x | {ratio:.2f} | {run.utilisation:.2f} | {run.peak_running} |")
    worst = min(ratio for _, _, ratio in speedups(runs)[1:]) if len(runs) > 1 else 1.0
    complete = all(run.done == run.trials for run in runs)
    lines.append(f"lowest ratio to linear {worst:.2f} (goal >= {GOAL}x: {'met' if worst >= GOAL else 'MISSED'})"
                 + ("" if complete else "; some trials did not finish (see the manifests)"))
    return lines


def main() -> None:
    """Run the grid at each slot count and print trials/hour against linear scaling."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is visible")
    parser.add_argument("--slots", default=None, help="comma-separated slot counts, first = baseline (cuda 1,2,4; cpu 1,2)")
    parser.add_argument("--grid", default=None, help="a serving grid (cuda: grids/kv-study-1gpu.yaml; cpu: grids/kv-scaling-cpu.yaml)")
    parser.add_argument("--results", default=None, help="keep the results here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    device: Device = args.device or ("cuda" if _gpus() else "cpu")
    try:
        slot_counts = [int(s) for s in (args.slots or DEFAULT_SLOTS[device]).split(",")]
    except ValueError:
        parser.error(f"--slots: comma-separated whole numbers such as 1,2,4; got {args.slots!r}")
    if not slot_counts or min(slot_counts) < 1:
        parser.error(f"--slots: each count must be at least 1; got {args.slots!r}")
    if device == "cuda" and max(slot_counts) > _gpus():
        parser.error(f"--slots: {max(slot_counts)} GPUs asked for, {_gpus()} visible")
    grid = Path(args.grid or DEFAULT_GRID[device])
    try:
        load_spec(grid)  # a bad grid: one line, before any Ray starts
    except (SpecError, OSError) as exc:
        parser.error(str(exc))
    data = yaml.safe_load(grid.read_text())
    print(f"machine: {platform.node()} {platform.machine()} cpus={os.cpu_count()} gpus={_gpus()} "
          f"python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; grid {grid} on {device} slots {slot_counts}")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(args.results) if args.results else Path(tmp)
        runs = measure(data, slot_counts, device, root)
    for line in table(runs):
        print(line)
    if args.json:
        rows = [{**asdict(run), "trials_per_hour": run.trials_per_hour, "speedup": speedup, "ratio_to_linear": ratio,
                 "utilisation": run.utilisation} for run, speedup, ratio in speedups(runs)]
        Path(args.json).write_text(json.dumps({"grid": str(grid), "device": device, "runs": rows}, indent=2))


def _gpus() -> int:
    """GPUs this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


if __name__ == "__main__":
    main()
