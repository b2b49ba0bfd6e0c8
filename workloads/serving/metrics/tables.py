"""Arrow schemas of the tables a serving trial writes (DESIGN.md "Tables").

The orchestrator's store adds ``experiment``, ``trial_id`` and the flattened grid parameters;
these schemas hold what the trial measured. Bump ``SCHEMA_VERSION`` when a column changes.
"""

from __future__ import annotations

import pyarrow as pa

from workloads.serving.metrics.latency import LATENCY_METRICS

SCHEMA_VERSION = "4"
_META = {b"schema_version": SCHEMA_VERSION.encode()}
LATENCY_STATS = ("mean", "median", "std", "p50", "p90", "p99")


def _schema(fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata=_META)


REQUESTS = _schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("backend", pa.string()),
        pa.field("arrival_s", pa.float64()),
        pa.field("send_s", pa.float64()),
        pa.field("first_token_s", pa.float64()),
        pa.field("finish_s", pa.float64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("ttft_s", pa.float64()),
        pa.field("tpot_s", pa.float64()),
        pa.field("e2el_s", pa.float64()),
        pa.field("itl_s", pa.list_(pa.float64())),
        pa.field("error", pa.string()),
        pa.field("needle_correct", pa.bool_()),  # needle prompts: output states the value; else null
    ]
)

ENGINE_STEPS = _schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("t_s", pa.float64()),
        pa.field("running", pa.int64()),
        pa.field("waiting", pa.int64()),
        pa.field("kv_blocks_used", pa.int64()),
        pa.field("kv_bytes_device", pa.int64()),
        pa.field("kv_bytes_host", pa.int64()),
        pa.field("h2d_bytes", pa.int64()),  # moved host -> device during this step
        pa.field("preemptions", pa.int64()),  # during this step
        pa.field("h2d_bytes_total", pa.int64()),  # since the trial's start
        pa.field("preemptions_total", pa.int64()),
    ]
)

SERVING_SUMMARY = _schema(
    [
        pa.field("backend", pa.string()),
        pa.field("transport", pa.string()),  # the one used (`transport: auto` resolved)
        pa.field("block_size", pa.int64()),  # KV block size the engine used (its default if not set)
        pa.field("num_requests", pa.int64()),
        pa.field("completed", pa.int64()),
        pa.field("failed", pa.int64()),
        pa.field("total_input_tokens", pa.int64()),
        pa.field("total_output_tokens", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("request_throughput", pa.float64()),
        pa.field("output_throughput", pa.float64()),
        pa.field("total_token_throughput", pa.float64()),
        pa.field("goodput", pa.float64()),  # null when no SLO was given
        *[
            pa.field(f"{metric}_ms_{stat}", pa.float64())
            for metric in LATENCY_METRICS
            for stat in LATENCY_STATS
        ],
        pa.field("max_send_lag_s", pa.float64()),  # open-loop check: max(send - scheduled arrival)
        pa.field("peak_kv_bytes", pa.int64()),  # engine peak, transients inside a step included
        pa.field("peak_kv_bytes_steps", pa.int64()),  # max KV resident between steps (sampled)
        pa.field("peak_kv_bytes_host", pa.int64()),
        pa.field("peak_device_bytes", pa.int64()),
        pa.field("h2d_bytes", pa.int64()),
        pa.field("preemptions", pa.int64()),
        pa.field("engine_steps", pa.int64()),
        pa.field("ppl", pa.float64()),  # null when quality was not measured
        pa.field("ppl_ref", pa.float64()),
        pa.field("ppl_ratio", pa.float64()),
        pa.field("token_agreement", pa.float64()),
        pa.field("needle_accuracy", pa.float64()),  # needle prompts: fraction answered exactly; else null
    ]
)

SERVING_PERCENTILES = _schema(
    [
        pa.field("metric", pa.string(), nullable=False),
        pa.field("percentile", pa.float64(), nullable=False),
        pa.field("value_ms", pa.float64()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "requests": REQUESTS,
    "engine_steps": ENGINE_STEPS,
    "serving_summary": SERVING_SUMMARY,
    "serving_percentiles": SERVING_PERCENTILES,
}


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column) as a table of the named schema; missing keys are null."""
    schema = TABLES[name]
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)
