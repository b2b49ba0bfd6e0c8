"""Trial kinds by name.

Built-in kinds are declared as ``orch.kinds`` entry points in ``pyproject.toml``; any other
kind can be named by its import path (``package.module:ClassName``). Adding a kind is one
module plus one entry-point line; nothing in ``orchestrator/`` changes.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from workloads.kind import TrialKind

ENTRY_POINT_GROUP = "orch.kinds"


class UnknownKindError(ValueError):
    """The grid names a kind that is neither registered nor importable."""


def registered_kinds() -> dict[str, str]:
    """Map of registered kind name -> 'module:Class' import path."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_kind(name: str) -> TrialKind:
    """Instantiate the kind called ``name`` (a registered name or 'module:Class')."""
    target = registered_kinds().get(name, name)
    if ":" not in target:
        allowed = ", ".join(sorted(registered_kinds())) or "(none installed)"
        raise UnknownKindError(f"unknown kind {name!r}; allowed: {allowed} or 'module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownKindError(f"kind {name!r}: cannot import {target!r} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, TrialKind)):
        raise UnknownKindError(f"kind {name!r}: {target!r} is not a TrialKind subclass")
    return cls()
