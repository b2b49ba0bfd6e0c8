"""One registration style for every extension point: a named ``Registry`` and its ``register`` decorator.

Each extension point (cache policies, compressors, engine model families, training tasks, serving
systems, trial kinds) owns one ``Registry``; the thing registered declares itself where it is
defined::

    POLICIES = Registry("cache policy")

    @POLICIES.register
    class H2OPolicy(CachePolicy):
        name = "h2o"

Everything else (grid validation, allowed values in error messages, docs tables) reads the
registry. ``import_submodules`` imports every module of a package so that adding a thing is one
file, with no hand-kept import list. The class lives in the lowest layer (``backends``) so that
backends, workloads and the orchestrator can all use it without importing against the rule
orchestrator -> workloads -> backends.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that no entry of a registry has."""


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one extension point (read like a dict; written with ``register``)."""

    def __init__(self, what: str, key: Callable[[Any], str] = lambda obj: obj.name,
                 loader: Callable[[], None] | None = None):
        self.what = what  # used in error messages: "unknown <what> 'x'; allowed: ..."
        self._key = key
        self._entries: dict[str, T] = {}
        # Imports the modules that register entries; run once, on the first read.
        self._loader = loader

    def load(self) -> Registry[T]:
        """Run the loader (once) so that every entry is registered; returns the registry."""
        loader, self._loader = self._loader, None
        if loader is not None:
            try:
                loader()
            except BaseException:
                self._loader = loader  # a failed import is retried (and reported) on the next read
                raise
        return self

    @overload
    def register(self, obj: T) -> T: ...

    @overload
    def register(self, obj: None = None, *, name: str) -> Callable[[T], T]: ...

    def register(self, obj: T | None = None, *, name: str | None = None) -> Any:
        """Decorator: add ``obj`` under ``name`` (default: its ``name`` attribute); returns ``obj``."""

        def add(entry: T) -> T:
            key = name if name is not None else self._key(entry)
            known = self._entries.get(key)
            if known is not None and known is not entry and _qualname(known) != _qualname(entry):
                raise ValueError(f"{self.what} {key!r} is registered twice: {_qualname(known)} and {_qualname(entry)}")
            self._entries[key] = entry
            return entry

        return add if obj is None else add(obj)

    def get_or_raise(self, name: str) -> T:
        """The entry called ``name``; ``UnknownNameError`` naming the allowed names otherwise."""
        try:
            return self[name]
        except KeyError:
            raise UnknownNameError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        """The one-line error for a name this registry lacks."""
        return f"unknown {self.what} {name!r}; allowed: {', '.join(sorted(self.load())) or '(none)'}"

    def __getitem__(self, name: str) -> T:
        return self.load()._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.load()._entries)

    def __len__(self) -> int:
        return len(self.load()._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self._entries)})"


def _qualname(obj: Any) -> str:
    # A module imported twice (e.g. as __main__ and by name) re-registers an equal class: not a clash.
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def import_submodules(package: str) -> None:
    """Import every module of ``package`` (not recursively), so their ``register`` decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
