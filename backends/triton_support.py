"""Whether Triton kernels can run on a device here: one check for every backend that has kernels."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here (compiled on CUDA, interpreted on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
