"""Model families by architecture name: each module registers its model with ``@MODELS.register``."""

from __future__ import annotations

from backends.kvcache.models.registry import MODELS
from backends.registry import import_submodules

import_submodules(__name__)

from backends.kvcache.models.llama import LlamaForCausalLM  # noqa: E402 (re-exported)
from backends.kvcache.models.opt import OPTForCausalLM  # noqa: E402

__all__ = ["MODELS", "LlamaForCausalLM", "OPTForCausalLM"]
