"""The Parquet dataset: typed, versioned, full-schema, readable without orch."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.store import ExperimentStore, ParamColumns, atomic_write_bytes
from tests.support.kinds import TOY_SUMMARY

REQUESTS = pa.schema(
    [("request_id", pa.string()), ("ttft_s", pa.float64()), ("itl_s", pa.list_(pa.float64())), ("error", pa.string())],
    metadata={b"schema_version": b"3"},
)


def _write_two_trials(root: Path) -> ExperimentStore:
    store = ExperimentStore(root, "exp")
    columns = ParamColumns.from_params([{"backend": "h2o", "load.rate": 1}, {"backend": "full", "load.rate": 2.5}])
    for trial_id, params, ttft in (("aaa-0", {"backend": "h2o", "load.rate": 1}, 0.1), ("0123-1", {"backend": "full", "load.rate": 2.5}, 0.2)):
        # the kind omits `error` and sends ints for a float column: the store conforms both
        requests = pa.table({"request_id": ["r0", "r1"], "ttft_s": [ttft, ttft * 2], "itl_s": [[0.01, 0.02], [0.03]]})
        store.write_table("requests", trial_id, requests, REQUESTS)
        summary = pa.table({"score": [1], "steps": [3], "pid": [1], "opened": [1]})
        store.write_table("toy_summary", trial_id, summary, TOY_SUMMARY, columns.columns(params, taken=set()))
    return store


def test_tables_read_back_with_pandas_duckdb_and_polars(tmp_path: Path) -> None:
    store = _write_two_trials(tmp_path)
    folder = tmp_path / "exp" / "requests"
    frame = pd.read_parquet(folder)
    assert sorted(frame["trial_id"].astype(str).unique()) == ["0123-1", "aaa-0"]
    assert len(frame) == 4 and set(frame["experiment"]) == {"exp"}
    rows = duckdb.sql(
        f"select trial_id, sum(ttft_s), count(*) from read_parquet('{folder}/**/*.parquet', hive_partitioning=true) "
        "group by trial_id order by trial_id"
    ).fetchall()
    assert [(r[0], round(r[1], 6), r[2]) for r in rows] == [("0123-1", 0.6, 2), ("aaa-0", 0.3, 2)]
    polars_frame = pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True)
    assert polars_frame.schema["itl_s"] == pl.List(pl.Float64)
    assert polars_frame.filter(pl.col("trial_id") == "aaa-0")["itl_s"].to_list() == [[0.01, 0.02], [0.03]]
    assert store.read_table("requests").num_rows == 4


def test_full_schema_with_version_and_typed_param_columns(tmp_path: Path) -> None:
    store = _write_two_trials(tmp_path)
    requests = pq.read_table(store.table_file("requests", "aaa-0"))
    assert requests.schema.metadata[b"schema_version"] == b"3"
    assert requests.column_names == ["experiment", "request_id", "ttft_s", "itl_s", "error"]
    assert requests.column("error").null_count == 2
    summary = pq.read_table(store.table_file("toy_summary", "aaa-0"))
    assert summary.schema.field("score").type == pa.float64()
    # `load.rate` holds 1 and 2.5 across trials -> one float column named by its leaf
    assert summary.schema.field("rate").type == pa.float64() and summary.column("rate").to_pylist() == [1.0]
    assert summary.column("backend").to_pylist() == ["h2o"]
    both = store.read_table("toy_summary")
    assert both.schema.field("rate").type == pa.float64()


def test_param_columns_disambiguate_leaf_collisions() -> None:
    columns = ParamColumns.from_params([{"policy.kv_budget": 0.2, "engine.kv_budget": 1, "model": "m", "backend.name": "h2o"}])
    assert columns.names == {"policy.kv_budget": "policy_kv_budget", "engine.kv_budget": "engine_kv_budget", "model": "model",
                             "backend.name": "backend"}


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_bytes(target, json.dumps({"a": 1}).encode())
    atomic_write_bytes(target, json.dumps({"a": 2}).encode())
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
