"""An experiment's finished trials, each table joined with the grid axes of its trials.

The axes of an experiment are the union of the axes its trials were run with and of the other
parameters whose values differ among its trials (``axis_names``), not the last submission's grid:
``orch report``, ``orch compare`` and the figures group by them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from orchestrator.expand import canonical_json, flatten, normalise_numbers
from orchestrator.store import PARAM_FIELD_KEY, ExperimentStore, ParamColumns

# Axes that only distinguish repeats: they are what error bars average over, never a series.
REPEAT_AXES = frozenset({"seed", "repeat"})


def trial_axes(entry: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys one trial's grid varied, flattened, with this trial's values.

    Each trial entry records its own ``axes``; the manifest's top-level ``axes`` are only the last
    submission's grid, so they stand in just for entries written before trials recorded theirs.
    """
    if "axes" in entry:
        return flatten(entry.get("axes") or {})
    grid = tuple(manifest.get("axes") or [])
    return {k: v for k, v in flatten(entry.get("params") or {}).items() if any(k == a or k.startswith(a + ".") for a in grid)}


def axis_names(manifest: dict[str, Any]) -> dict[str, str]:
    """Dotted axis key -> column name (the naming of the Parquet parameter columns), repeat axes left out.

    The axes are the union of what every trial of the experiment varied, in the order trials were
    entered (a later submission under the same experiment may vary other keys than an earlier one,
    and the earlier trials must keep being told apart by theirs), plus every other parameter whose
    value differs among the trials: two submissions that differ only in their base (say
    ``load.num_requests``) ran different configurations, never repeats of one.
    """
    entries = list(manifest.get("trials", {}).values())
    flats = [flatten(e.get("params", {})) for e in entries]
    names = ParamColumns.from_params(flats).names
    keys: dict[str, None] = {}
    for entry in entries:
        keys.update(dict.fromkeys(trial_axes(entry, manifest)))
    for key in dict.fromkeys(k for flat in flats for k in flat):
        # compared as the trial id hashes them: 1 and 1.0 alike, dicts by content
        if key not in keys and len({canonical_json(normalise_numbers(flat.get(key))) for flat in flats}) > 1:
            keys[key] = None
    return {key: names.get(key, key.replace(".", "_")) for key in keys if key.rsplit(".", 1)[-1] not in REPEAT_AXES}


@dataclass
class ExperimentData:
    """Finished trials of one experiment: their axes, and their tables on demand."""

    store: ExperimentStore
    manifest: dict[str, Any]
    # One row per done trial (index trial_id): the axis columns and `repeat`.
    trials: pd.DataFrame
    axes: list[str]
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict)
    _params: dict[str, set[str]] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        """The experiment's name."""
        return self.store.experiment

    @property
    def kind(self) -> str:
        """The trial kind (serving, training, ...)."""
        return str(self.manifest.get("kind", ""))

    @property
    def varying(self) -> list[str]:
        """Axes with more than one value among the finished trials."""
        return [a for a in self.axes if self.trials[a].astype(str).nunique() > 1]

    def table(self, name: str) -> pd.DataFrame | None:
        """Rows of one table for the done trials, with `trial_id`, `repeat` and the axis columns."""
        if name not in self._tables:
            self._tables[name] = self._read(name)
        return self._tables[name]

    def param_columns(self, name: str) -> set[str]:
        """Columns of a table that hold grid parameters (not measurements)."""
        self.table(name)
        return self._params.get(name, set())

    def _read(self, name: str) -> pd.DataFrame | None:
        if self.trials.empty:
            return None
        table = self.store.read_table(name, trial_ids=list(self.trials.index))
        if table is None or table.num_rows == 0:
            return None
        self._params[name] = {f.name for f in table.schema if PARAM_FIELD_KEY in (f.metadata or {})}
        frame = table.to_pandas()
        frame["trial_id"] = frame["trial_id"].astype(str)
        # The axis values come from the manifest; a kind's own column of the same name yields.
        frame = frame.drop(columns=[c for c in self.trials.columns if c in frame.columns])
        frame = frame.join(self.trials, on="trial_id")
        # Rows in the grid's order (the manifest's), so series and bars appear as the grid lists them.
        order = {trial_id: index for index, trial_id in enumerate(self.trials.index)}
        return frame.sort_values("trial_id", key=lambda ids: ids.map(order), kind="stable").reset_index(drop=True)


def load_experiment(store: ExperimentStore) -> ExperimentData:
    """The done trials of an experiment and their axes."""
    manifest = store.load_manifest() or {}
    names = axis_names(manifest)
    axes = list(dict.fromkeys(names.values()))
    rows = {}
    for trial_id, entry in manifest.get("trials", {}).items():
        if entry.get("state") != "done":
            continue
        # Each axis holds the trial's own parameter value, also where its submission did not vary
        # it; a trial whose parameters do not set it has none (null), and stays apart from those that do.
        flat = flatten(entry.get("params") or {})
        flat.update(trial_axes(entry, manifest))
        row: dict[str, Any] = {column: None for column in axes}
        # a list value (say needle depths) as its text: axis values are grouped on, so hashable
        row.update({names[k]: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items() if k in names})
        row["repeat"] = entry.get("repeat", 0)
        rows[trial_id] = row
    trials = pd.DataFrame.from_dict(rows, orient="index", columns=[*axes, "repeat"])
    trials.index.name = "trial_id"
    return ExperimentData(store=store, manifest=manifest, trials=trials, axes=axes)
