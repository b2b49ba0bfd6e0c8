"""Trial kinds by name.

A kind is one class decorated with ``@KINDS.register`` in ``workloads/<family>/kind.py``; the
built-in kinds register when this registry is first read (every ``workloads.*.kind`` module is
imported: no hand-kept list). Kinds from other installed packages plug in as ``orch.kinds``
entry points, loaded into the same registry; a grid may also name a kind by import path
(``package.module:ClassName``). Nothing in ``orchestrator/`` changes when a kind is added.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from importlib.metadata import entry_points

from backends.registry import Registry
from workloads.kind import TrialKind

ENTRY_POINT_GROUP = "orch.kinds"


class UnknownKindError(ValueError):
    """The grid names a kind that is neither registered nor importable."""


def _load_builtin_kinds() -> None:
    import workloads

    for info in pkgutil.iter_modules(workloads.__path__):
        if info.ispkg and importlib.util.find_spec(f"workloads.{info.name}.kind") is not None:
            importlib.import_module(f"workloads.{info.name}.kind")


KINDS: Registry[type[TrialKind]] = Registry("kind", loader=_load_builtin_kinds)


def _plugin(name: str) -> str | None:
    """The 'module:Class' of an external kind declared as an ``orch.kinds`` entry point."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.value
    return None


def registered_kinds() -> list[str]:
    """Names of the built-in and plugged-in kinds."""
    return sorted(set(KINDS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_kind(name: str) -> TrialKind:
    """Instantiate the kind called ``name`` (a registered name or 'module:Class')."""
    if name in KINDS:
        return KINDS[name]()
    target = _plugin(name) or name
    if ":" not in target:
        allowed = ", ".join(registered_kinds()) or "(none installed)"
        raise UnknownKindError(f"unknown kind {name!r}; allowed: {allowed} or 'module:Class'")
    module_name, _, attr = target.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise UnknownKindError(f"kind {name!r}: expected 'package.module:Class' (an absolute module path and a class)")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # whatever importing someone's module raises: one line, not a traceback
        raise UnknownKindError(f"kind {name!r}: cannot import {target!r} ({type(exc).__name__}: {exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, TrialKind)):
        raise UnknownKindError(f"kind {name!r}: {target!r} is not a TrialKind subclass")
    try:
        kind = cls()
    except Exception as exc:
        raise UnknownKindError(f"kind {name!r}: cannot create {target!r} ({type(exc).__name__}: {exc})") from None
    if target != name:  # an entry point: registered under its name from now on
        KINDS.register(cls, name=name)
    return kind
