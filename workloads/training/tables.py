"""The training tables (DESIGN.md "Tables") and how the ranks' rows become them."""

from __future__ import annotations

import statistics
from typing import Any

import pyarrow as pa

from workloads.training.params import TrainingParams

SCHEMA_VERSION = {b"schema_version": b"3"}
BANDWIDTHS_GBIT = (1, 10, 25)
STEP_PARTS = ("compute_s", "compress_s", "comm_s", "decompress_s", "optim_s")

TRAIN_STEPS = pa.schema(
    [
        ("compressor", pa.string()), ("rank", pa.int64()), ("step", pa.int64()), ("epoch", pa.int64()),
        ("loss", pa.float64()), ("compute_s", pa.float64()), ("compress_s", pa.float64()),
        ("comm_s", pa.float64()), ("decompress_s", pa.float64()), ("optim_s", pa.float64()),
        ("step_s", pa.float64()), ("bytes_sent", pa.int64()), ("bytes_recv", pa.int64()),
        ("payload_bytes", pa.int64()), ("samples_per_s", pa.float64()), ("attempt", pa.int64()),
        # Measured on the worker's own interface (trials with a `network`); null otherwise.
        ("wire_bytes_sent", pa.int64()), ("wire_bytes_recv", pa.int64()),
    ],
    metadata=SCHEMA_VERSION,
)
TRAIN_EVALS = pa.schema(
    [
        ("compressor", pa.string()), ("step", pa.int64()), ("split", pa.string()), ("model", pa.string()),
        ("loss", pa.float64()), ("ppl", pa.float64()), ("accuracy", pa.float64()),
        ("divergence", pa.float64()), ("train_s", pa.float64()),
    ],
    metadata=SCHEMA_VERSION,
)
TRAIN_SUMMARY = pa.schema(
    [
        ("compressor", pa.string()), ("workload", pa.string()), ("num_workers", pa.int64()),
        ("steps", pa.int64()), ("wall_s", pa.float64()), ("train_s", pa.float64()),
        ("step_time_s", pa.float64()),
        # Medians over every rank's steps of each part of a step (train_steps' columns).
        *[(f"step_{part}", pa.float64()) for part in STEP_PARTS],
        ("time_to_target_s", pa.float64()),
        ("final_ppl", pa.float64()), ("final_ppl_average", pa.float64()), ("test_ppl", pa.float64()),
        ("final_accuracy", pa.float64()), ("final_divergence", pa.float64()), ("unigram_ppl", pa.float64()),
        ("bytes_sent_total", pa.int64()), ("bytes_recv_total", pa.int64()),
        ("bytes_per_worker_step", pa.float64()), ("payload_bytes_per_worker_step", pa.float64()),
        ("wire_bytes_per_worker_step", pa.float64()),
        *[(f"comm_model_s_{g}gbit", pa.float64()) for g in BANDWIDTHS_GBIT],
        ("restarts", pa.int64()), ("resumed_from_step", pa.int64()),
        # What rank 0's NCCL was told (the interconnect's variables) and what its channels used
        # (from NCCL's INFO log; GPU trials only): workloads/training/interconnect.py.
        ("nccl_env", pa.string()), ("nccl_paths", pa.string()),
    ],
    metadata=SCHEMA_VERSION,
)
TABLES = {"train_steps": TRAIN_STEPS, "train_evals": TRAIN_EVALS, "train_summary": TRAIN_SUMMARY}


def comm_model_s(step_rows: list[dict[str, Any]], gbit_per_s: float) -> float:
    """Modelled communication time: per step the busiest worker's max(sent, received) bytes over
    a full-duplex link of ``gbit_per_s``, summed over steps (bandwidth term only, no latency)."""
    busiest: dict[int, int] = {}
    for row in step_rows:
        busiest[row["step"]] = max(busiest.get(row["step"], 0), row["bytes_sent"], row["bytes_recv"])
    return sum(busiest.values()) * 8 / (gbit_per_s * 1e9)


def _last(rows: list[dict[str, Any]], split: str, model: str) -> dict[str, Any] | None:
    matching = [r for r in rows if r["split"] == split and r["model"] == model]
    return matching[-1] if matching else None


def _mean_present(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def build_tables(
    params: TrainingParams, states: list[dict[str, Any]], wall_s: float, nccl_paths: str | None = None
) -> dict[str, pa.Table]:
    """train_steps (every rank), train_evals (rank 0's evaluations) and the one-row train_summary."""
    name = params.compressor.name
    step_rows = [{"compressor": name, **row} for state in states for row in state["step_rows"]]
    rank0 = next(s for s in states if s["rank"] == 0)
    eval_rows = [{"compressor": name, **row} for row in rank0["eval_rows"]]
    final = _last(eval_rows, "valid", "rank0") or {}
    final_avg = _last(eval_rows, "valid", "average") or {}
    test = _last(eval_rows, "test", "rank0") or {}
    rows_per_worker = max(len(step_rows), 1)
    restarts = rank0["restarts"]
    summary = {
        "compressor": name,
        "workload": params.workload,
        "num_workers": params.num_workers,
        "steps": rank0["step"],
        "wall_s": wall_s,
        "train_s": rank0["train_s"],
        "step_time_s": statistics.median(r["step_s"] for r in step_rows) if step_rows else None,
        **{f"step_{part}": statistics.median(r[part] for r in step_rows) if step_rows else None for part in STEP_PARTS},
        "time_to_target_s": rank0["time_to_target_s"],
        "final_ppl": final.get("ppl"),
        "final_ppl_average": final_avg.get("ppl"),
        "test_ppl": test.get("ppl"),
        "final_accuracy": final.get("accuracy"),
        "final_divergence": final.get("divergence"),
        "unigram_ppl": rank0["baseline"].get("unigram_ppl"),
        "bytes_sent_total": sum(r["bytes_sent"] for r in step_rows),
        "bytes_recv_total": sum(r["bytes_recv"] for r in step_rows),
        "bytes_per_worker_step": sum(r["bytes_sent"] for r in step_rows) / rows_per_worker,
        "payload_bytes_per_worker_step": sum(r["payload_bytes"] for r in step_rows) / rows_per_worker,
        "wire_bytes_per_worker_step": _mean_present(r.get("wire_bytes_sent") for r in step_rows),
        **{f"comm_model_s_{g}gbit": comm_model_s(step_rows, g) for g in BANDWIDTHS_GBIT},
        "restarts": len(restarts),
        "resumed_from_step": restarts[-1] if restarts else None,
        "nccl_env": rank0.get("nccl_env"),
        "nccl_paths": nccl_paths,
    }
    return {
        "train_steps": pa.Table.from_pylist(step_rows, schema=TRAIN_STEPS),
        "train_evals": pa.Table.from_pylist(eval_rows, schema=TRAIN_EVALS),
        "train_summary": pa.Table.from_pylist([summary], schema=TRAIN_SUMMARY),
    }
