"""The cache-policy registry and the base of each policy's typed parameters.

A policy is one file in this folder: a ``CachePolicy`` subclass decorated with
``@POLICIES.register`` that declares its ``name``, whether it is ``lossy`` (drops cache
entries, so output quality is measured against ``full``), and its knobs as a ``PolicyKnobs``
model (``params_model``). The grid's ``policy.*`` section, the serving backends and the quality
defaults are all derived from these declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.registry import Registry

if TYPE_CHECKING:
    from backends.kvcache.policies.base import CachePolicy

POLICIES: Registry[type[CachePolicy]] = Registry("cache policy")


class PolicyKnobs(BaseModel):
    """A policy's typed parameters; every policy takes ``kv_budget`` (fraction of tokens kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_budget: float = Field(default=1.0, gt=0, le=1)

    @classmethod
    def resolve(cls, policy: str, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` knobs checked and completed with this policy's defaults (one-line ValueError)."""
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"policy {policy!r}: unknown parameters {unknown}; allowed: {sorted(cls.model_fields)}")
        try:
            return cls(**given).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"policy {policy!r}: {where}: {first['msg']}") from None
