"""Results on disk: versioned Arrow schemas, a hive-partitioned Parquet dataset, the manifest.

Layout under ``<results>/<experiment>/``::

    <table>/trial_id=<id>/part-0.parquet   one file per table per trial (rewritten on rerun)
    artifacts/<trial_id>/...               tracebacks and the kind's artifacts
    manifest.json                          trial states, attempts, errors; submissions

Only the driver writes. Every write is atomic (temp file + rename) and a trial's Parquet is
written before the manifest marks it done, so a crash never leaves a done trial without data.
Files do not contain ``trial_id``: it is the hive partition key, so pandas, DuckDB and Polars
read it from the path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from orchestrator.provenance import ENVIRONMENT_KEYS

SCHEMA_VERSION_KEY = b"schema_version"
PARAM_FIELD_KEY = b"orch.param"  # field metadata marking a column that holds a grid parameter
TERMINAL_STATES = frozenset({"done", "failed", "timeout", "cancelled"})
STATES = ("queued", "running", "done", "failed", "timeout", "cancelled")

TRIALS_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("state", pa.string()),
        ("attempts", pa.int64()),
        ("node", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("error", pa.string()),
        ("repeat", pa.int64()),
        # the environment the trial ran in (provenance.ENVIRONMENT_KEYS)
        *((key, pa.string()) for key in ENVIRONMENT_KEYS),
    ],
    metadata={SCHEMA_VERSION_KEY: b"2"},
)


STORE_ID_NAME = ".store_id"


def _durable_replace(tmp: Path | str, path: Path) -> None:
    """Rename a written temp file over ``path`` so that a power loss leaves the old or the new file,
    never an empty one: the data reaches the disk before the rename, the rename before we go on."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a durable rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _durable_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _arrow_type(values: Iterable[Any]) -> pa.DataType:
    """One Arrow type for a parameter across all trials (ints widen to floats)."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def _param_value(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(arrow_type):
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if pa.types.is_floating(arrow_type):
        return float(value)
    return value


@dataclass(frozen=True)
class ParamColumns:
    """How flattened parameters become typed columns: column name and Arrow type per dotted key."""

    names: dict[str, str]
    types: dict[str, pa.DataType]

    @classmethod
    def from_params(cls, flat_params: list[dict[str, Any]]) -> ParamColumns:
        """Name each dotted key by its leaf when that is unique, else by the full path."""
        keys: list[str] = []
        for flat in flat_params:
            keys.extend(k for k in flat if k not in keys)
        # `backend.name` reads better as `backend`: a trailing `name` takes its parent's name.
        leaves = [k.rsplit(".", 2)[-2] if k.endswith(".name") else k.rsplit(".", 1)[-1] for k in keys]
        names = {k: (leaf if leaves.count(leaf) == 1 else k.replace(".", "_")) for k, leaf in zip(keys, leaves, strict=True)}
        types = {k: _arrow_type(flat.get(k) for flat in flat_params) for k in keys}
        return cls(names=names, types=types)

    def columns(self, flat: dict[str, Any]) -> list[tuple[pa.Field, Any]]:
        """(field, value) pairs for one trial (``write_table`` skips names its table already has)."""
        out = []
        for key, name in self.names.items():
            arrow_type = self.types[key]
            field = pa.field(name, arrow_type, metadata={PARAM_FIELD_KEY: key.encode()})
            out.append((field, _param_value(flat.get(key), arrow_type)))
        return out


def conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """Cast a kind's table to its declared schema: missing columns become nulls; extra columns are kept after."""
    if schema is None:
        return table
    arrays, fields = [], []
    for schema_field in schema:
        if schema_field.name in table.column_names:
            arrays.append(table.column(schema_field.name).cast(schema_field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, schema_field.type))
        fields.append(schema_field)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def unify_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for files written by different submissions: ints widen to floats, new columns are added,
    and a column whose types cannot be merged becomes a string."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for item in schema:
            seen = fields.get(item.name)
            if seen is None or seen.type.equals(item.type):
                fields.setdefault(item.name, item)
                continue
            try:
                fields[item.name] = pa.unify_schemas([pa.schema([seen]), pa.schema([item])], promote_options="permissive")[0]
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                fields[item.name] = pa.field(item.name, pa.string(), metadata=seen.metadata)
    return pa.schema(list(fields.values()), metadata=schemas[0].metadata)


class ExperimentStore:
    """Reads and writes one experiment's folder."""

    def __init__(self, results_root: Path | str, experiment: str):
        self.root = Path(results_root)
        self.experiment = experiment
        self.path = self.root / experiment
        self._schemas: dict[str, pa.Schema] = {}  # table -> the schema every file of it has

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.path / "manifest.json"

    @property
    def store_id(self) -> str:
        """A random id of this experiment's folder, made once (a copy or a move keeps it): its MLflow
        runs carry it, so another folder's runs of the same experiment name are never taken for its own."""
        path = self.path / STORE_ID_NAME
        if not path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            try:  # first writer wins; a racing one reads the winner's id below
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(uuid.uuid4().hex)
                    fh.flush()
                    os.fsync(fh.fileno())
        return path.read_text().strip()

    def artifacts_dir(self, trial_id: str) -> Path:
        """Folder of one trial's artifacts."""
        return self.path / "artifacts" / trial_id

    def workdir(self, trial_id: str) -> Path:
        """Scratch folder of one trial that survives retries (checkpoints)."""
        return self.path / "work" / trial_id

    def table_file(self, table: str, trial_id: str) -> Path:
        """The Parquet file of one table for one trial."""
        return self.path / table / f"trial_id={trial_id}" / "part-0.parquet"

    # -- tables -------------------------------------------------------------------------
    def write_table(
        self,
        name: str,
        trial_id: str,
        table: pa.Table,
        schema: pa.Schema | None,
        params: list[tuple[pa.Field, Any]] | None = None,
    ) -> Path:
        """Conform and write one trial's table; ``params`` are constant columns appended, except
        where the table has a column of that name: its own value (what the trial ran) wins."""
        table = conform(table, schema)
        metadata = table.schema.metadata
        columns = [pa.array([self.experiment] * table.num_rows, pa.string())]
        fields = [pa.field("experiment", pa.string())]
        taken = {"experiment", *table.column_names}
        for param_field, value in params or []:
            if param_field.name in taken:
                continue
            columns.append(pa.array([value] * table.num_rows, param_field.type))
            fields.append(param_field)
            taken.add(param_field.name)
        table = table.drop_columns([c for c in ("experiment", "trial_id") if c in table.column_names])
        arrays = [columns[0], *table.columns, *columns[1:]]
        out = pa.Table.from_arrays(arrays, schema=pa.schema([fields[0], *table.schema, *fields[1:]], metadata=metadata))
        out = self._same_schema_as_the_rest(name, trial_id, out)
        path = self.table_file(name, trial_id)
        self._write_file(path, out)
        return path

    def _same_schema_as_the_rest(self, name: str, trial_id: str, table: pa.Table) -> pa.Table:
        """Keep every file of a table on one schema, so plain readers (pandas, DuckDB, Polars) read them as one.

        A submission whose parameters changed type (20 -> 20.5) or gained columns widens the
        schema; the files already written are rewritten to it once.
        """
        current = self._schemas.get(name)
        if current is None:
            other = next((f for f in self.table_files(name) if f != self.table_file(name, trial_id)), None)
            current = pq.read_schema(other) if other is not None else table.schema
        if current.equals(table.schema):
            self._schemas[name] = current
            return table
        unified = unify_schemas([current, table.schema])
        # Every file must take the schema before any is rewritten: a cast Arrow lacks (a list to a
        # string) would otherwise fail half-way and leave the table on two schemas. A missing
        # cast fails on no rows as on many, so the older files are checked by their schemas.
        out = conform(table, unified)
        if not unified.equals(current):
            older = [path for path in self.table_files(name) if path != self.table_file(name, trial_id)]
            for path in older:
                conform(pq.read_schema(path).empty_table(), unified)
            for path in older:
                self._write_file(path, conform(pq.read_table(path), unified))
        self._schemas[name] = unified
        return out

    def keep_unstored(self, trial_id: str, tables: dict[str, pa.Table]) -> Path:
        """Write a trial's tables as they came (no schema) to ``artifacts/<trial>/unstored/``, when
        they could not join their tables: the trial fails, its measurements stay on disk."""
        folder = self.artifacts_dir(trial_id) / "unstored"
        for name, table in tables.items():
            self._write_file(folder / f"{name}.parquet", table)
        return folder

    @staticmethod
    def _write_file(path: Path, table: pa.Table) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # lz4 and dictionaries only for strings: ~2x the write rate of zstd with dictionaries
        # everywhere, at a modest size cost (see docs/BENCHMARKS.md).
        strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
        try:
            pq.write_table(table, tmp, compression="lz4", use_dictionary=strings)
            _durable_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def table_files(self, name: str) -> list[Path]:
        """Every trial's Parquet file of one table."""
        return sorted((self.path / name).glob("trial_id=*/part-0.parquet"))

    def write_trial_row(self, trial_id: str, record: dict[str, Any], params: list[tuple[pa.Field, Any]]) -> Path:
        """Write the one-row ``trials`` table of a trial in a terminal state."""
        row = {f.name: [record.get(f.name)] for f in TRIALS_SCHEMA if f.name != "experiment"}
        table = pa.table(row, schema=pa.schema([f for f in TRIALS_SCHEMA if f.name != "experiment"]))
        return self.write_table("trials", trial_id, table, TRIALS_SCHEMA.remove(0), params)

    def remove_trial_tables(self, trial_id: str) -> None:
        """Remove one trial's files of every table but ``trials`` (an earlier attempt's, or a partial write)."""
        for name in self.table_names():
            if name != "trials":
                shutil.rmtree(self.path / name / f"trial_id={trial_id}", ignore_errors=True)

    def table_names(self) -> list[str]:
        """Tables present in this experiment."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and any(p.glob("trial_id=*")))

    def read_table(self, name: str, trial_ids: Iterable[str] | None = None) -> pa.Table | None:
        """The whole dataset of one table (with the trial_id partition column), or None."""
        folder = self.path / name
        if not folder.is_dir():
            return None
        wanted = set(trial_ids) if trial_ids is not None else None
        files = [
            str(p) for p in self.table_files(name) if wanted is None or p.parent.name.removeprefix("trial_id=") in wanted
        ]
        if not files:
            return None
        # Files of older submissions may differ (types, columns): read them all as one schema.
        schema = unify_schemas([pq.read_schema(f) for f in files])
        schema = schema.append(pa.field("trial_id", pa.string())) if "trial_id" not in schema.names else schema
        partitioning = ds.partitioning(pa.schema([("trial_id", pa.string())]), flavor="hive")
        dataset = ds.dataset(files, schema=schema, format="parquet", partitioning=partitioning, partition_base_dir=str(folder))
        return dataset.to_table()

    def read_trial_table(self, name: str, trial_id: str) -> pa.Table | None:
        """One trial's table as written, or None."""
        path = self.table_file(name, trial_id)
        return pq.read_table(path) if path.exists() else None

    def trial_table_files(self, trial_id: str) -> dict[str, Path]:
        """table name -> Parquet file, for the tables this trial wrote."""
        return {name: self.table_file(name, trial_id) for name in self.table_names() if self.table_file(name, trial_id).exists()}

    # -- manifest ------------------------------------------------------------------------
    def load_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the experiment has never been submitted.

        Raises ``ManifestError`` (naming the file and what is wrong) when it is not a JSON object with
        ``trials`` an object of objects; the file is left as it is: nothing replaces a manifest it cannot read.
        """
        path = self.manifest_path
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(path, f"{exc.msg} (line {exc.lineno} col {exc.colno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(path, str(exc)) from None
        if not isinstance(data, dict):
            raise ManifestError(path, f"a JSON {_json_type(data)}, not an object")
        trials = data.get("trials", {})
        if not isinstance(trials, dict) or not all(isinstance(entry, dict) for entry in trials.values()):
            raise ManifestError(path, "'trials' is not an object of trial objects")
        if not isinstance(data.get("submissions", []), list):
            raise ManifestError(path, "'submissions' is not a list")
        return data

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Atomically replace the manifest."""
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, separators=(",", ":"), default=str).encode())


class ManifestError(ValueError):
    """A manifest that cannot be read; ``str(err)`` is one line for the user (the CLI exits 2)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is unreadable: {reason}")
        self.path = path
        self.reason = reason


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def list_experiments(results_root: Path | str) -> list[str]:
    """Experiments (folders with a manifest) under a results root."""
    root = Path(results_root)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))
