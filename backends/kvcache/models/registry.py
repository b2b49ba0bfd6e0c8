"""The engine's model families by architecture name (``ModelConfig.arch``).

A family is one module in this folder whose ``...ForCausalLM`` class is decorated with
``@MODELS.register(name="<arch>")``, plus the branch of ``ModelConfig.from_hf`` that maps a HF
``model_type`` to that arch; importing the package imports them all.
"""

from __future__ import annotations

from torch import nn

from backends.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model family")
