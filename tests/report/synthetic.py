"""Small experiments written straight through the store (no Ray): known values for report tests."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator.expand import flatten, trial_id_for
from orchestrator.store import ExperimentStore, ParamColumns
from workloads.serving.metrics.tables import TABLES as SERVING_TABLES
from workloads.training.tables import TABLES as TRAINING_TABLES

BACKENDS = ("full", "h2o")
RATES = (1.0, 2.0, 4.0)
COMPRESSORS = ("dense", "topk", "a2sgd")


def ttft_ms(backend: str, rate: float, repeat: int, slowdown: float = 1.0) -> float:
    """The synthetic TTFT p50: grows with rate, h2o 20% faster, +-1 ms between repeats."""
    base = 10.0 * rate * (0.8 if backend == "h2o" else 1.0)
    return (base + (1.0 if repeat % 2 else -1.0)) * slowdown


def _write(store: ExperimentStore, kind: str, axes: list[str], trials: list[tuple[dict[str, Any], int, dict[str, pa.Table]]],
           schemas: dict[str, pa.Schema]) -> None:
    """One submission, as the driver records it: the parameter columns of its own trials, the manifest's
    top-level ``axes`` replaced by its grid's, each trial entry with its own ``axes``."""
    columns = ParamColumns.from_params([flatten(p) for p, _, _ in trials])
    manifest: dict[str, Any] = store.load_manifest() or {"experiment": store.experiment, "kind": kind, "trials": {},
                                                         "submissions": []}
    manifest["axes"] = axes
    manifest["submissions"].append({"id": f"s{len(manifest['submissions']) + 1}", "status": "done", "parent_run_id": None})
    for params, repeat, tables in trials:
        trial_id = trial_id_for(kind, params, repeat)
        flat = flatten(params)
        for name, table in tables.items():
            store.write_table(name, trial_id, table, schemas[name],
                              columns.columns(flat) if name.endswith("_summary") else None)
        manifest["trials"][trial_id] = {"state": "done", "params": params, "repeat": repeat, "attempts": 1,
                                        "axes": {a: flat[a] for a in axes},
                                        "submission": len(manifest["submissions"]) - 1}
    store.save_manifest(manifest)


def serving_experiment(root: Path, name: str = "serve", slowdown: float = 1.0, repeats: int = 2,
                       rates: tuple[float, ...] = RATES, failed: int = 0,
                       no_p99: frozenset[tuple[str, float, int]] = frozenset()) -> ExperimentStore:
    """backend x request_rate, `repeats` repeats; TTFT from `ttft_ms`, throughput = 5 x rate.

    ``failed`` requests in every trial; ``no_p99``: the (backend, rate, repeat) trials whose
    ``ttft_ms_p99`` is missing (null)."""
    store = ExperimentStore(root, name)
    trials = []
    for backend, rate, repeat in itertools.product(BACKENDS, rates, range(repeats)):
        params = {"model": "tiny", "backend": {"name": backend}, "load": {"request_rate": rate, "seed": 0}}
        ttft = ttft_ms(backend, rate, repeat, slowdown)
        row = {"backend": backend, "completed": 10, "failed": failed, "request_throughput": rate,
               "output_throughput": 5.0 * rate / slowdown, "goodput": rate * (1.0 if rate < 4 else 0.5),
               "peak_kv_bytes": int(2**20 * (0.3 if backend == "h2o" else 1.0)), "peak_device_bytes": 2**24}
        for metric, scale in (("ttft", 1.0), ("tpot", 0.2), ("itl", 0.2), ("e2el", 3.0)):
            row[f"{metric}_ms_p50"] = ttft * scale
            row[f"{metric}_ms_p99"] = ttft * scale * 2
            row[f"{metric}_ms_mean"] = ttft * scale * 1.1
        if (backend, rate, repeat) in no_p99:
            row["ttft_ms_p99"] = None
        summary = pa.Table.from_pylist([row], schema=SERVING_TABLES["serving_summary"])
        trials.append((params, repeat, {"serving_summary": summary}))
    _write(store, "serving", ["backend.name", "load.request_rate"][: 1 + (len(rates) > 1)], trials, SERVING_TABLES)
    return store


MODELS = ("tiny", "smollm2-135m")
PROMPT_SOURCES = ("random", "sharegpt")


def resubmitted_serving_experiment(root: Path, name: str = "serve") -> ExperimentStore:
    """`serving_experiment` (backend x request_rate, 2 repeats: 12 trials), then a second submission of the
    same experiment with other axes: model x load.prompt_source (backend full, rate 1, one repeat), TTFT
    100, 110, 120, 130 ms in that order. The manifest's top-level ``axes`` are the second grid's."""
    serving_experiment(root, name)
    store = ExperimentStore(root, name)  # a new driver: no schema cached from the first submission
    trials = []
    for index, (model, source) in enumerate(itertools.product(MODELS, PROMPT_SOURCES)):
        params = {"model": model, "backend": {"name": "full"}, "load": {"request_rate": 1.0, "seed": 0, "prompt_source": source}}
        row = {"backend": "full", "completed": 10, "failed": 0, "ttft_ms_p50": 100.0 + 10 * index, "output_throughput": 5.0}
        trials.append((params, 0, {"serving_summary": pa.Table.from_pylist([row], schema=SERVING_TABLES["serving_summary"])}))
    _write(store, "serving", ["model", "load.prompt_source"], trials, SERVING_TABLES)
    return store


def training_experiment(root: Path, name: str = "train", steps: int = 20, repeats: int = 2,
                        time_to_target: dict[str, list[float | None]] | None = None) -> ExperimentStore:
    """One trial per compressor and repeat; loss 5 / sqrt(step + 1); topk 2x and a2sgd 4x faster than dense.

    ``time_to_target``: each compressor's ``time_to_target_s`` per repeat (None: never reached).
    """
    store = ExperimentStore(root, name)
    speed = {"dense": 1.0, "topk": 2.0, "a2sgd": 4.0}
    wire = {"dense": 4e6, "topk": 8e4, "a2sgd": 8.0}
    trials = []
    for compressor, repeat in itertools.product(COMPRESSORS, range(repeats)):
        params = {"workload": "lstm", "compressor": {"name": compressor}, "seed": 0}
        step_s = 0.1 / speed[compressor]
        steps_rows = [{"compressor": compressor, "rank": rank, "step": s, "epoch": 0, "loss": 5 / math.sqrt(s + 1) + 0.01 * repeat,
                       "compute_s": step_s * 0.5, "compress_s": step_s * 0.1, "comm_s": step_s * 0.3,
                       "decompress_s": step_s * 0.05, "optim_s": step_s * 0.05, "step_s": step_s,
                       "bytes_sent": int(wire[compressor]), "bytes_recv": int(wire[compressor]), "payload_bytes": 8,
                       "samples_per_s": 100.0, "attempt": 1} for s in range(steps) for rank in (0, 1)]
        evals = [{"compressor": compressor, "step": s, "split": "valid", "model": "rank0", "loss": 5 / math.sqrt(s + 1),
                  "ppl": math.exp(5 / math.sqrt(s + 1)), "train_s": s * step_s} for s in range(0, steps, 5)]
        summary = {"compressor": compressor, "workload": "lstm", "num_workers": 2, "steps": steps, "wall_s": steps * step_s,
                   "train_s": steps * step_s, "step_time_s": step_s * (1 + 0.02 * repeat), "final_ppl": evals[-1]["ppl"],
                   "bytes_per_worker_step": wire[compressor],
                   "time_to_target_s": time_to_target[compressor][repeat] if time_to_target else None}
        tables = {"train_steps": pa.Table.from_pylist(steps_rows, schema=TRAINING_TABLES["train_steps"]),
                  "train_evals": pa.Table.from_pylist(evals, schema=TRAINING_TABLES["train_evals"]),
                  "train_summary": pa.Table.from_pylist([summary], schema=TRAINING_TABLES["train_summary"])}
        trials.append((params, repeat, tables))
    _write(store, "training", ["compressor.name"], trials, TRAINING_TABLES)
    return store


# A needle study: policy x budget (zipped, full only at 1.0) x context length.
BUDGET_POINTS = (("full", 1.0), ("h2o", 0.5), ("h2o", 0.2), ("streaming", 0.5), ("streaming", 0.2))
CONTEXT_LENS = (1024, 2048)


def needle_accuracy(backend: str, budget: float, input_len: int) -> float:
    """The synthetic accuracy: full 1.0; h2o loses (1 - budget) / 2, streaming (1 - budget); longer is 0.1 worse."""
    loss = {"full": 0.0, "h2o": 0.5, "streaming": 1.0}[backend] * (1 - budget)
    return max(0.0, 1.0 - loss - (0.1 if input_len > 1024 and backend != "full" else 0.0))


def budget_experiment(root: Path, name: str = "needles", knob: str = "kv_budget") -> ExperimentStore:
    """(backend, budget) zipped x load.input_len; one repeat; KV memory = budget x 4 MiB x length / 1024.

    ``knob``: the budget as ``kv_budget`` (the fraction) or ``kv_budget_tokens`` (1000 x the fraction).
    """
    store = ExperimentStore(root, name)
    trials = []
    for (backend, budget), input_len in itertools.product(BUDGET_POINTS, CONTEXT_LENS):
        value = budget if knob == "kv_budget" else int(1000 * budget)
        params = {"model": "smollm2-135m", "backend": {"name": backend}, "policy": {knob: value},
                  "load": {"input_len": input_len, "prompt_source": "needle", "seed": 0}}
        row = {"backend": backend, "completed": 5, "failed": 0, "output_throughput": 100.0 / budget,
               "peak_kv_bytes": int(budget * 4 * 2**20 * input_len / 1024),
               "peak_kv_bytes_steps": int(budget * 2 * 2**20 * input_len / 1024),
               "needle_accuracy": needle_accuracy(backend, budget, input_len)}
        summary = pa.Table.from_pylist([row], schema=SERVING_TABLES["serving_summary"])
        trials.append((params, 0, {"serving_summary": summary}))
    _write(store, "serving", ["backend.name", f"policy.{knob}", "load.input_len"], trials, SERVING_TABLES)
    return store


NETWORK_COMPRESSORS = ("dense", "topk", "qsgd", "a2sgd")


def time_to_target_s(compressor: str, bandwidth_gbit: float, repeat: int) -> float | None:
    """Synthetic: a2sgd 8/10/12 s in repeats 0/1/2, qsgd 20x those, dense 5x at 0.1 Gb/s (never in
    repeat 2) and 5 / sqrt(10) x at 1 Gb/s, topk 30 s in every repeat."""
    if compressor == "dense" and bandwidth_gbit == 0.1 and repeat == 2:
        return None
    if compressor == "topk":
        return 30.0
    factor = {"a2sgd": 1.0, "qsgd": 20.0, "dense": 5.0 * (0.1 / bandwidth_gbit) ** 0.5}[compressor]
    return (8.0 + 2.0 * repeat) * factor


def network_training_experiment(root: Path, name: str = "a2sgd-network", repeats: int = 3) -> ExperimentStore:
    """compressor x network.bandwidth_gbit (0.1, 1), `repeats` repeats: summaries only, times from
    `time_to_target_s`, payload 8 B for a2sgd and 1,000 B otherwise, wire 100 x payload for a2sgd."""
    store = ExperimentStore(root, name)
    trials = []
    for compressor, bandwidth, repeat in itertools.product(NETWORK_COMPRESSORS, (0.1, 1.0), range(repeats)):
        params = {"workload": "lstm", "compressor": {"name": compressor}, "seed": 0,
                  "network": {"bandwidth_gbit": bandwidth, "latency_ms": 0.5}}
        payload = 8.0 if compressor == "a2sgd" else 1000.0
        summary = {"compressor": compressor, "workload": "lstm", "num_workers": 4, "steps": 100,
                   "time_to_target_s": time_to_target_s(compressor, bandwidth, repeat), "step_time_s": 0.1 + 0.01 * repeat,
                   "payload_bytes_per_worker_step": payload,
                   "wire_bytes_per_worker_step": payload * (100.0 if compressor == "a2sgd" else 1.05),
                   "final_divergence": 0.01 * (repeat + 1) if compressor == "a2sgd" else 0.0,
                   "step_compute_s": 0.06, "step_comm_s": 0.002 * (repeat + 1) / bandwidth}
        trials.append((params, repeat, {"train_summary": pa.Table.from_pylist([summary], schema=TRAINING_TABLES["train_summary"])}))
    _write(store, "training", ["compressor.name", "network.bandwidth_gbit"], trials, TRAINING_TABLES)
    return store
