"""Error feedback (GRACE's Memory): compensate before compress, keep the residual after."""

from __future__ import annotations

import torch


class Memory:
    """No error feedback: compensate is the identity, nothing is kept."""

    def compensate(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return v = g (+ e when feedback is on)."""
        return tensor

    def update(self, name: str, compensated: torch.Tensor, reference: torch.Tensor) -> None:
        """Remember what compression lost: e = v - reference."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals by name (empty without feedback)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore residuals."""


class ResidualMemory(Memory):
    """Error feedback: v = g + e; after the step, e = v - reference (per tensor name)."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """v = g + e (a new tensor; the gradient is left untouched)."""
        residual = self.residuals.get(name)
        return tensor.clone() if residual is None else tensor + residual

    def update(self, name: str, compensated: torch.Tensor, reference: torch.Tensor) -> None:
        """e = v - reference."""
        self.residuals[name] = compensated - reference

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals by name, on CPU for checkpoints."""
        return {k: v.detach().cpu() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore residuals (moved to the device on first use)."""
        self.residuals = dict(state)

    def to(self, device: torch.device) -> None:
        """Move residuals to ``device`` (after loading a checkpoint)."""
        self.residuals = {k: v.to(device) for k, v in self.residuals.items()}
