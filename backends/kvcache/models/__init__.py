"""Model families by architecture name."""

from __future__ import annotations

from backends.kvcache.models.llama import LlamaForCausalLM
from backends.kvcache.models.opt import OPTForCausalLM

MODELS = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}

__all__ = ["MODELS", "LlamaForCausalLM", "OPTForCausalLM"]
