"""What a model needs from the engine while running: the attention call into the KV cache policy."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    """Runs attention for one layer against the KV cache (owned by the cache policy)."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, k_raw: torch.Tensor
    ) -> torch.Tensor:
        """q [B,T,H,D], k/v [B,T,KVH,D] (k after RoPE), x = the attention input [B,T,hidden],
        k_raw = keys before RoPE; returns the attention output [B,T,H,D]."""
        ...


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Split a fused projection [B,T,(H+2KVH)*D] into q [B,T,H,D], k and v [B,T,KVH,D]."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (
        q.view(b, t, num_heads, head_dim),
        k.view(b, t, num_kv_heads, head_dim),
        v.view(b, t, num_kv_heads, head_dim),
    )
