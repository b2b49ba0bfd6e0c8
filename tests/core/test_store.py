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
        store.write_table("toy_summary", trial_id, summary, TOY_SUMMARY, columns.columns(params))
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


def test_a_parameter_named_like_a_column_of_the_table_leaves_the_table_value(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path, "exp")
    params = {"steps": 5, "load.rate": 1}  # the grid asked for 5 steps; the trial reports the 3 it ran
    summary = pa.table({"score": [1], "steps": [3], "pid": [1], "opened": [1]})
    store.write_table("toy_summary", "a-0", summary, TOY_SUMMARY, ParamColumns.from_params([params]).columns(params))
    written = pq.read_table(store.table_file("toy_summary", "a-0"))
    assert written.column_names.count("steps") == 1 and written.column("steps").to_pylist() == [3]
    assert written.column("rate").to_pylist() == [1] and not [c for c in written.column_names if c.startswith("param_")]


def test_a_table_no_schema_reconciles_is_refused_before_any_older_file_is_rewritten(tmp_path: Path) -> None:
    import pytest

    store = ExperimentStore(tmp_path, "exp")
    store.write_table("t", "a-0", pa.table({"x": [1.0]}), None)
    with pytest.raises(pa.ArrowNotImplementedError):  # list -> string: a cast Arrow does not have
        store.write_table("t", "b-0", pa.table({"x": [[1.0]]}), None)
    older = pq.read_table(store.table_file("t", "a-0"))
    assert older.schema.field("x").type == pa.float64() and older.column("x").to_pylist() == [1.0]
    assert not store.table_file("t", "b-0").exists()


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


def _summary(store: ExperimentStore, trial_id: str, params: dict) -> None:
    columns = ParamColumns.from_params([params]).columns(params)
    store.write_table("toy_summary", trial_id, pa.table({"score": [1.0]}), TOY_SUMMARY, columns)


def test_submissions_with_new_types_and_columns_read_as_one_table_everywhere(tmp_path: Path) -> None:
    # three submissions (each its own store object): rate an int, then a float and a new parameter
    _summary(ExperimentStore(tmp_path, "exp"), "a-0", {"rate": 20})
    _summary(ExperimentStore(tmp_path, "exp"), "b-0", {"rate": 20.5, "policy.kv_budget": 0.5})
    _summary(ExperimentStore(tmp_path, "exp"), "c-0", {"rate": 3})
    expected = [("a-0", 20.0, None), ("b-0", 20.5, 0.5), ("c-0", 3.0, None)]

    def rows(frame: pd.DataFrame) -> list[tuple]:
        frame = frame.assign(trial_id=frame["trial_id"].astype(str)).sort_values("trial_id")
        return [(t, r, None if pd.isna(k) else k) for t, r, k in zip(frame["trial_id"], frame["rate"], frame["kv_budget"],
                                                                      strict=True)]

    folder = tmp_path / "exp" / "toy_summary"
    assert rows(ExperimentStore(tmp_path, "exp").read_table("toy_summary").to_pandas()) == expected
    assert rows(pd.read_parquet(folder)) == expected  # the recipes of docs/results.md
    assert rows(duckdb.sql(f"select * from read_parquet('{folder}/*/*.parquet', hive_partitioning=true)").df()) == expected
    assert rows(pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).to_pandas()) == expected


def test_files_of_drifted_schemas_left_by_older_versions_are_read_as_one(tmp_path: Path) -> None:
    folder = tmp_path / "exp" / "t"
    for trial_id, table in {"a-0": pa.table({"rate": [1]}), "b-0": pa.table({"rate": [2.5], "new": ["x"]})}.items():
        (folder / f"trial_id={trial_id}").mkdir(parents=True)
        pq.write_table(table, folder / f"trial_id={trial_id}" / "part-0.parquet")
    table = ExperimentStore(tmp_path, "exp").read_table("t").sort_by("trial_id")
    assert table.column("rate").to_pylist() == [1.0, 2.5] and table.column("new").to_pylist() == [None, "x"]
