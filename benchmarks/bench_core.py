"""Core orchestrator benchmarks: scheduling overhead, Parquet write rate, MLflow logging.

Run: ``python -m benchmarks.bench_core`` (or ``make bench``). Prints each measurement next to
its goal; the baseline for scheduling is the trials' own work measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from orchestrator.cluster import set_ray_env
from orchestrator.expand import expand
from orchestrator.scheduler import Submission
from orchestrator.spec import parse_spec
from orchestrator.store import ExperimentStore
from orchestrator.tracking import Tracker

REQUESTS_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("arrival_s", pa.float64()), ("send_s", pa.float64()),
     ("first_token_s", pa.float64()), ("finish_s", pa.float64()), ("prompt_tokens", pa.int64()),
     ("output_tokens", pa.int64()), ("ttft_s", pa.float64()), ("tpot_s", pa.float64()), ("e2el_s", pa.float64()),
     ("itl_s", pa.list_(pa.float64())), ("error", pa.string())],
    metadata={b"schema_version": b"1"},
)


def bench_scheduling(trials: int, root: Path, with_mlflow: bool) -> dict[str, float]:
    """Wall time per trivial trial through the scheduler (Ray already running)."""
    spec = parse_spec({"experiment": f"sched-{int(with_mlflow)}", "kind": "tests.support.kinds:ToyKind",
                       "grid": {"x": list(range(trials))}, "base": {"steps": 0}, "resources": {"num_cpus": 1}})
    from tests.support.kinds import ToyKind

    kind = ToyKind()
    store = ExperimentStore(root, spec.experiment)
    tracker = Tracker(store) if with_mlflow else None
    start = time.perf_counter()
    outcome = Submission(spec, kind, expand(spec, kind), store, tracker).run()
    wall = time.perf_counter() - start
    assert outcome.counts["done"] == trials, outcome.counts
    return {"wall_s": wall, "per_trial_ms": 1000 * wall / trials}


def bench_parquet(rows: int, root: Path) -> dict[str, float]:
    """Rows/s writing one request-shaped table of ``rows`` rows through the store."""
    rng = np.random.default_rng(0)
    arrival = np.sort(rng.uniform(0, 3600, rows))
    ttft = rng.exponential(0.2, rows)
    e2el = ttft + rng.exponential(2.0, rows)
    itl_offsets = np.arange(0, rows * 4 + 1, 4, dtype=np.int32)
    table = pa.table({
        "request_id": pa.array([f"r{i}" for i in range(rows)]),
        "arrival_s": arrival, "send_s": arrival, "first_token_s": arrival + ttft, "finish_s": arrival + e2el,
        "prompt_tokens": rng.integers(16, 2048, rows), "output_tokens": np.full(rows, 5),
        "ttft_s": ttft, "tpot_s": (e2el - ttft) / 4, "e2el_s": e2el,
        "itl_s": pa.ListArray.from_arrays(pa.array(itl_offsets), pa.array(rng.exponential(0.05, rows * 4))),
        "error": pa.nulls(rows, pa.string()),
    })
    store = ExperimentStore(root, "parquet")
    start = time.perf_counter()
    store.write_table("requests", "bench-0", table, REQUESTS_SCHEMA)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "rows_per_s": rows / wall}


def bench_mlflow(metrics: int, root: Path) -> dict[str, float]:
    """Seconds to log ``metrics`` step metrics to one run in the SQLite store."""
    store = ExperimentStore(root, "mlflow-bench")
    tracker = Tracker(store)
    run = tracker.client.create_run(tracker.experiment_id)
    triples = [(f"m{i % 10}", float(i), i // 10) for i in range(metrics)]
    start = time.perf_counter()
    tracker.log_metrics(run.info.run_id, triples)
    wall = time.perf_counter() - start
    logged = sum(len(tracker.client.get_metric_history(run.info.run_id, f"m{k}")) for k in range(10))
    assert logged == metrics, logged
    return {"wall_s": wall}


def main() -> None:
    """Run the three core benchmarks and print results against their goals."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--metrics", type=int, default=10_000)
    args = parser.parse_args()
    set_ray_env()
    import ray

    print(f"machine: {platform.node()} {platform.machine()} cpus={os.cpu_count()} python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(tmp)
        parquet = bench_parquet(args.rows, root)
        print(f"parquet: {args.rows} request rows in {parquet['wall_s']:.3f} s = {parquet['rows_per_s'] / 1e6:.2f} M rows/s "
              f"(goal >= 1 M rows/s: {'met' if parquet['rows_per_s'] >= 1e6 else 'MISSED'})")
        mlflow = bench_mlflow(args.metrics, root)
        print(f"mlflow: {args.metrics} step metrics in {mlflow['wall_s']:.2f} s "
              f"(goal <= 2 s: {'met' if mlflow['wall_s'] <= 2 else 'MISSED'})")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            bench_scheduling(4, root / "warm", with_mlflow=False)  # worker start-up outside the measurement
            bare = bench_scheduling(args.trials, root, with_mlflow=False)
            tracked = bench_scheduling(args.trials, root, with_mlflow=True)
        finally:
            ray.shutdown()
        for name, result in (("scheduling (Parquet + manifest)", bare), ("scheduling (+ MLflow child runs)", tracked)):
            print(f"{name}: {args.trials} trivial trials in {result['wall_s']:.1f} s = {result['per_trial_ms']:.1f} ms/trial "
                  f"(goal <= 20 ms: {'met' if result['per_trial_ms'] <= 20 else 'MISSED'})")


if __name__ == "__main__":
    main()
