"""Llama family (Llama 2/3, SmolLM2, Mistral-like): RMSNorm, RoPE, GQA, SiLU-gated MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from backends.kvcache.config import ModelConfig
from backends.kvcache.models.common import AttentionContext, split_qkv
from backends.kvcache.models.registry import MODELS


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementation does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # one Triton launch instead of ~7 elementwise kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from backends.kvcache.kernels import ops

            return ops().rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3 style scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif sc and sc.get("rope_type", sc.get("type")) == "linear":
        inv = inv / sc["factor"]
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (h + 2 * kv) * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.fused = False  # RoPE of q and k in one Triton launch each

    def forward(self, x, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = split_qkv(self.qkv_proj(x), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        k_raw = k
        if self.fused and x.shape[0] == 1:
            from backends.kvcache.kernels import ops

            c, s = cos[0, :, 0], sin[0, :, 0]  # [T, D]
            q, k = ops().rope(q[0], c, s).unsqueeze(0), ops().rope(k[0], c, s).unsqueeze(0)
        else:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = ctx.attend(self.layer, q, k, v, x, k_raw)
        return self.o_proj(out.flatten(2))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h, cos, sin, ctx):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


@MODELS.register(name="llama")
class LlamaForCausalLM(nn.Module):
    """Decoder stack; ``forward`` returns hidden states, ``logits`` projects chosen rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def use_fused_kernels(self, on: bool) -> None:
        """Route RMSNorm and RoPE through the Triton kernels (GPU path) or the reference code."""
        for m in self.modules():
            if isinstance(m, RMSNorm | LlamaAttention):
                m.fused = on

    def post_materialize(self) -> None:
        """Re-tie embeddings and rebuild buffers after the module moved off the meta device."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        freqs = positions.unsqueeze(-1).float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B,T,1,D]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32) for hidden rows [N, hidden]."""
        return self.lm_head(hidden).float()

    def attention_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(Wq [H*D, hidden], bq, Wk [KVH*D, hidden], bk) of one layer, for offline analysis (InfiniGen)."""
        cfg = self.cfg
        w = self.layers[layer].self_attn.qkv_proj
        hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        b = w.bias
        return (
            w.weight[:hq],
            None if b is None else b[:hq],
            w.weight[hq : hq + hk],
            None if b is None else b[hq : hq + hk],
        )

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF's LlamaForCausalLM, fusing q/k/v and gate/up."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        own: dict[str, torch.Tensor] = {}
        for i in range(self.cfg.num_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [sd.get(f"{p}self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")]
                if all(t is not None for t in parts):
                    own[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat(parts, 0)
                parts = [sd.get(f"{p}mlp.{n}_proj.{kind}") for n in ("gate", "up")]
                if all(t is not None for t in parts):
                    own[f"{p}mlp.gate_up_proj.{kind}"] = torch.cat(parts, 0)
        for k, v in sd.items():
            if ".q_proj." in k or ".k_proj." in k or ".v_proj." in k or ".gate_proj." in k or ".up_proj." in k:
                continue
            own[k] = v
        if "lm_head.weight" not in own:
            own["lm_head.weight"] = own["embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if m != "inv_freq"]
        if missing or unexpected:
            raise ValueError(f"llama weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
