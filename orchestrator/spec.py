"""Grid file -> validated, typed ``GridSpec``.

Every way a grid file can be wrong ends in one ``SpecError`` whose message is a single line
naming the key path and what is allowed; nothing else escapes ``load_spec``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
MAX_GRID_BYTES = 1_000_000
MAX_TRIALS = 100_000

# Values a parameter may take: what survives a round trip through JSON, Arrow and MLflow.
Scalar = str | int | float | bool | None


class SpecError(ValueError):
    """A grid file is invalid; ``str(err)`` is one line meant for the user."""


def check_experiment_name(name: str) -> str:
    """``name`` if it can name a results folder and an MLflow experiment, else ValueError (one line)."""
    # fullmatch: `$` would also accept a name ending in a newline
    if not EXPERIMENT_NAME.fullmatch(name) or name in {".", ".."}:
        raise ValueError("must match [A-Za-z0-9._-]+, at most 100 characters, and not be '.' or '..'")
    return name


class Resources(BaseModel):
    """Per-trial resources (per worker for training). Unknown keys are custom Ray resources."""

    model_config = ConfigDict(extra="allow")

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = Field(default=None, ge=0, description="bytes of memory reserved by the trial")

    @model_validator(mode="after")
    def _custom_are_numbers(self) -> Resources:
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"custom resource {key!r} must be a non-negative number, got {value!r}")
        return self

    def as_dict(self) -> dict[str, float]:
        """Flat mapping: num_cpus, num_gpus, memory (if set) and custom resources."""
        out: dict[str, float] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            out["memory"] = float(self.memory)
        out.update({k: float(v) for k, v in (self.model_extra or {}).items()})
        return out


class GridSpec(BaseModel):
    """A grid file after validation (see DESIGN.md, "Grid file")."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    kind: str
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    repeats: int = Field(default=1, ge=1, le=1000)
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(default=2, ge=0, le=100)
    timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return check_experiment_name(value)

    @field_validator("grid", "zip")
    @classmethod
    def _axes_not_empty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in axes.items():
            if not values:
                raise ValueError(f"axis {key!r} is empty; give at least one value")
        return axes

    @field_validator("zip")
    @classmethod
    def _zip_lengths_equal(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        lengths = {key: len(values) for key, values in axes.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip lists must have equal lengths, got {lengths}")
        return axes

    @model_validator(mode="after")
    def _axes_disjoint(self) -> GridSpec:
        both = set(self.grid) & set(self.zip)
        if both:
            raise ValueError(f"grid and zip both set {sorted(both)}; give each key in one of them")
        return self

    @property
    def axes(self) -> list[str]:
        """The dotted keys that vary across trials (grid then zip)."""
        return [*self.grid, *self.zip]


def _check_values(value: Any, path: str) -> None:
    """Reject values that cannot be parameters (dates, binary, NaN, non-string keys)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise SpecError(f"{path}: keys must be non-empty strings, got {key!r}")
            _check_values(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{path}: {value!r} is not allowed; use a finite number (or the string 'inf' where a kind accepts it)")
    elif not isinstance(value, Scalar):
        raise SpecError(
            f"{path}: {type(value).__name__} values are not allowed; use strings, numbers, booleans, lists or mappings"
        )


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice (YAML's own loaders silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {seen}); give each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    """Safe YAML: no explicit tags and no aliases (alias bombs), plain data only."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise SpecError(f"{source}: YAML aliases (*{event.anchor}) are not allowed; write values out")
            tag = getattr(event, "tag", None)
            if tag is not None:  # only explicitly tagged nodes carry a tag in the event stream
                raise SpecError(f"{source}: YAML tags ({tag}) are not allowed; use plain values")
        documents = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except DuplicateKeyError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nesting too deep") from None
    if len(documents) != 1:
        raise SpecError(f"{source}: expected exactly one YAML document, found {len(documents)}")
    return documents[0]


def _format_validation_error(exc: ValidationError) -> str:
    """First pydantic error as 'key.path: message'."""
    err = exc.errors()[0]
    path = ".".join(str(part) for part in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif err["type"].endswith("_type"):  # strict: a value of the wrong type is never coerced
        message += f" (got {type(err['input']).__name__} {err['input']!r})"
    return f"{path}: {message}"


def parse_spec(data: Any, source: str = "grid") -> GridSpec:
    """Validate already-parsed grid data."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: top level must be a mapping with keys experiment, kind, base, grid, ...")
    try:
        _check_values(data, "")
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: nesting too deep") from None
    try:
        # Strict, as JSON types: `repeats: "2"` or `retries: true` is an error, not coerced.
        spec = GridSpec.model_validate(data, strict=True)
    except ValidationError as exc:
        allowed = ", ".join(GridSpec.model_fields)
        line = _format_validation_error(exc)
        if line.endswith("unknown key") and "." not in line.split(":")[0]:
            line += f" (allowed: {allowed})"
        raise SpecError(f"{source}: {line}") from None
    count = spec.repeats * math.prod(len(v) for v in spec.grid.values())
    count *= len(next(iter(spec.zip.values()))) if spec.zip else 1
    if count > MAX_TRIALS:
        raise SpecError(f"{source}: the grid expands to {count} trials; at most {MAX_TRIALS} are allowed")
    return spec


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a grid file."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{source}: cannot read grid file ({exc.strerror or exc})") from None
    if len(raw) > MAX_GRID_BYTES:
        raise SpecError(f"{source}: grid file is {len(raw)} bytes; at most {MAX_GRID_BYTES} are allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{source}: grid file is not UTF-8 text") from None
    return parse_spec(_parse_yaml(text, source), source)
