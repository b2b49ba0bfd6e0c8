"""The cache-policy registry and the base of each policy's typed parameters.

A policy is one file in this folder: a ``CachePolicy`` subclass decorated with
``@POLICIES.register`` that declares its ``name``, whether it is ``lossy`` (drops cache
entries, so output quality is measured against ``full``), and its knobs as a ``PolicyKnobs``
model (``params_model``). The grid's ``policy.*`` section, the serving backends and the quality
defaults are all derived from these declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.registry import Registry

if TYPE_CHECKING:
    from backends.kvcache.policies.base import CachePolicy

POLICIES: Registry[type[CachePolicy]] = Registry("cache policy")


class PolicyKnobs(BaseModel):
    """A policy's typed parameters. Every policy takes a budget, as a fraction of the tokens a
    sequence has seen (``kv_budget``) or as a count (``kv_budget_tokens``: entries kept per
    sequence in each layer and KV head), and a floor (``min_tokens``): a sequence that has seen
    at most that many tokens keeps them all, and a longer one never keeps fewer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_budget: float = Field(default=1.0, gt=0, le=1)
    kv_budget_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_budget_form(self) -> PolicyKnobs:
        if self.kv_budget_tokens is not None and "kv_budget" in self.model_fields_set and self.kv_budget is not None:
            raise ValueError("give kv_budget (a fraction) or kv_budget_tokens (a count), not both")
        return self

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
            where = "".join(f"{p}: " for p in first["loc"][:1])
            message = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"policy {policy!r}: {where}{message}") from None
