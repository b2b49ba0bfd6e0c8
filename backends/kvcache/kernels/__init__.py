"""The engine's GPU kernels (Triton) behind plain functions, and when they can be used.

On a GPU the kernels are compiled; on a CPU-only host they run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before this package was first used (that is how CI tests them
against the reference attention). Everywhere else the engine keeps its PyTorch reference path.
"""

from __future__ import annotations

from types import ModuleType

import torch

from backends.triton_support import triton_usable

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'triton' on a GPU with Triton installed, else 'torch'; a named one is checked."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if name == "triton" and not triton_usable(device):
        raise ValueError(
            f"attention_backend 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
            f"device is {device.type}"
        )
    return name


def reads_mapped_host(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernels on ``device`` can read and write pinned host memory in place (mapped
    memory under unified addressing): probed once with a tiny gather, False off a GPU."""
    if device.type != "cuda" or not triton_usable(device):
        return False
    src = torch.arange(64, dtype=dtype).view(4, 16).pin_memory()
    idx = torch.tensor([2, 0, 3], device=device)
    ok = torch.tensor([True, False, True], device=device)
    try:
        out = ops().gather_rows(src, idx, ok, torch.empty(3, 16, dtype=dtype, device=device))
        return bool(torch.equal(out.cpu(), torch.stack([src[2], torch.zeros(16, dtype=dtype), src[3]])))
    except Exception:  # noqa: BLE001  (a driver without mapped pinned memory: the caller falls back)
        return False


def ops() -> ModuleType:
    """The Triton kernel module (imported on first use, after the interpreter choice is made)."""
    from backends.kvcache.kernels import triton_kernels

    return triton_kernels


__all__ = ["BACKENDS", "ops", "reads_mapped_host", "resolve_backend", "triton_usable"]
