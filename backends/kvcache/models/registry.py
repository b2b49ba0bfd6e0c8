"""The engine's model families by architecture name (a config's ``model_type``).

A family is one module in this folder whose ``...ForCausalLM`` class is decorated with
``@MODELS.register(name="<model_type>")``; importing the package imports them all.
"""

from __future__ import annotations

from torch import nn

from backends.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model family")
