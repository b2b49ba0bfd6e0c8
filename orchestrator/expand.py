"""GridSpec -> trials: grid is a cartesian product, zip lists vary together, then repeats.

A trial id is a short hash of the kind and the canonical parameters (validated, defaults filled
in, whole floats as ints, keys sorted), plus the repeat index, so the same grid always yields the
same ids, a resubmission resumes, and writing a default out explicitly changes nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from orchestrator.spec import GridSpec, SpecError
from workloads.kind import KindParams, TrialKind


@dataclass(frozen=True)
class Trial:
    """One run of a kind with one set of parameters."""

    trial_id: str
    index: int
    repeat: int
    params: dict[str, Any]  # nested, as merged from the grid file (defaults not filled in)
    axes: dict[str, Any]  # the varied dotted keys and this trial's values
    resources: dict[str, float]
    group_key: str  # trials with equal keys can share one engine session


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the hashing form of parameters."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def short_hash(value: Any, length: int = 10) -> str:
    """Stable hex digest of a JSON-able value."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def trial_id_for(kind: str, params: dict[str, Any], repeat: int) -> str:
    """Stable trial id: hash of kind + canonical params (see ``canonical_params``), then the repeat index."""
    return f"{short_hash({'kind': kind, 'params': params})}-{repeat}"


def normalise_numbers(value: Any) -> Any:
    """Whole floats become ints, recursively, so 20 and 20.0 hash alike; infinities are spelled 'inf'."""
    if isinstance(value, dict):
        return {k: normalise_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_numbers(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # JSON has no infinity; kinds read the string back
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def validate_params(kind: TrialKind, params: dict[str, Any]) -> KindParams:
    """The kind's typed parameters, validated strictly as JSON types: no string -> number, no bool -> int."""
    return kind.params_model.model_validate_json(canonical_json(params), strict=True)


def canonical_params(validated: KindParams) -> dict[str, Any]:
    """What a trial id hashes: every parameter with its defaults filled in, numbers normalised."""
    return normalise_numbers(validated.model_dump(mode="json"))


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def set_dotted(target: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` inside nested dicts; a conflict with an existing scalar is a SpecError."""
    parts = dotted.split(".")
    if any(not part for part in parts):
        raise SpecError(f"{source}.{dotted}: empty component in dotted key")
    node = target
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise SpecError(f"{source}.{dotted}: conflicts with {where!r}, which is a value, not a mapping")
        node = child
    leaf = parts[-1]
    if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
        raise SpecError(f"{source}.{dotted}: conflicts with keys below {dotted!r}; set those instead")
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for key, item in value.items():
            set_dotted(node[leaf], key, item, f"{source}.{dotted}")
    else:
        node[leaf] = value


def resolve_paths(params: dict[str, Any], path_keys: frozenset[str], base_dir: Path) -> dict[str, Any]:
    """A copy of ``params`` with the relative paths at ``path_keys`` made absolute against ``base_dir``."""
    out = _copy(params)
    for dotted in path_keys:
        node: Any = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and not Path(node[leaf]).expanduser().is_absolute():
            # abspath, not resolve(): a venv's bin/python is a symlink, and following it would
            # start the base interpreter outside the venv.
            node[leaf] = os.path.abspath(base_dir / node[leaf])
    return out


def _base_params(base: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in base.items():
        set_dotted(params, key, _copy(value), "base")
    return params


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _combinations(spec: GridSpec) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Each combination of axis values, with the grid-file section each key came from."""
    grid_keys = list(spec.grid)
    zip_keys = list(spec.zip)
    zip_rows = list(zip(*spec.zip.values(), strict=True)) if zip_keys else [()]
    combos = []
    for grid_values in itertools.product(*spec.grid.values()):
        for zip_values in zip_rows:
            values = dict(zip(grid_keys, grid_values, strict=True)) | dict(zip(zip_keys, zip_values, strict=True))
            sources = {k: "grid" for k in grid_keys} | {k: "zip" for k in zip_keys}
            combos.append((values, sources))
    return combos


def _source_of(loc: tuple[Any, ...], sources: dict[str, str], values: dict[str, Any], unknown: bool = False) -> str:
    """Where an error is: the axis or base key, or a section checked as a whole with the axis values in it."""
    dotted = ".".join(str(p) for p in loc)
    for key, section in sources.items():
        if dotted == key or dotted.startswith(key + "."):
            return f"{section}.{dotted}"
    if unknown:  # an unknown key that an axis's dotted path brought in (grid `foo.bar`: no section foo)
        for key, section in sources.items():
            if key.startswith(dotted + "."):
                return f"{section}.{key}"
    # A check across keys (a model validator): name the axis values that took part.
    inside = [f"{k}={v}" for k, v in values.items() if not dotted or k.startswith(dotted + ".")]
    if inside:
        return f"{dotted or 'trial'} (with {', '.join(inside)})"
    return f"base.{dotted}" if dotted else "base"


def _message(exc: ValidationError) -> str:
    """The first error's message; a wrong type also says what was given."""
    err = exc.errors()[0]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"].endswith("_type") or err["type"].endswith("_parsing"):
        message += f" (got {type(err['input']).__name__} {err['input']!r})"
    return message


def _without(params: dict[str, Any], dotted_keys: frozenset[str]) -> dict[str, Any]:
    flat = flatten(params)
    return {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in dotted_keys)}


def _axis_values(trial: Trial) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial.axes.items()) or "no axes"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section at ``loc`` (a path of field names below ``model``); [] if not a model."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sections = [t for t in (field.annotation, *get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return sorted(model.model_fields)


def expand(spec: GridSpec, kind: TrialKind, source: str = "grid") -> list[Trial]:
    """All trials of a spec, validated against the kind's parameter model."""
    try:
        base = _base_params(spec.base)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    resources = spec.resources.as_dict()
    trials: list[Trial] = []
    for values, sources in _combinations(spec):
        params = _copy(base)
        try:
            for key, value in values.items():
                set_dotted(params, key, _copy(value), sources[key])
        except SpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
        try:
            canonical = canonical_params(validate_params(kind, params))
        except ValidationError as exc:
            error = exc.errors()[0]
            message, unknown = _message(exc), error["type"] == "extra_forbidden"
            if unknown:
                allowed = _allowed_keys(kind.params_model, error["loc"][:-1])
                message += f" {str(error['loc'][-1])!r} (allowed: {', '.join(allowed)})" if allowed else ""
            raise SpecError(f"{source}: {_source_of(error['loc'], sources, values, unknown)}: {message}") from None
        except SpecError:
            raise
        except ValueError as exc:
            raise SpecError(f"{source}: {exc}") from None
        group = short_hash({"params": _without(canonical, kind.load_keys), "resources": resources})
        for repeat in range(spec.repeats):
            trials.append(
                Trial(
                    trial_id=trial_id_for(spec.kind, canonical, repeat),
                    index=len(trials),
                    repeat=repeat,
                    params=params,
                    axes=dict(values),
                    resources=resources,
                    group_key=group,
                )
            )
    first: dict[str, Trial] = {}
    for trial in trials:
        twin = first.setdefault(trial.trial_id, trial)
        if twin is not trial:
            raise SpecError(f"{source}: two trials have identical parameters ({_axis_values(twin)}; "
                            f"{_axis_values(trial)}): make the axis values distinct")
    return trials
