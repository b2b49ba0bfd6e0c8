"""OPT family (the model the H2O and InfiniGen papers measured): learned positions, pre-LayerNorm, ReLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from backends.kvcache.config import ModelConfig
from backends.kvcache.models.common import AttentionContext, split_qkv
from backends.kvcache.models.registry import MODELS

ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu}
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, d = cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * h * d, bias=cfg.enable_bias)
        self.out_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = split_qkv(self.qkv_proj(x), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        return self.out_proj(ctx.attend(self.layer, q, k, v, x, k).flatten(2))


class OPTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = OPTAttention(cfg, layer)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.enable_bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.self_attn(self.self_attn_layer_norm(h), ctx)
            return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
        h = self.self_attn_layer_norm(h + self.self_attn(h, ctx))
        return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))


@MODELS.register(name="opt")
class OPTForCausalLM(nn.Module):
    """Decoder stack; ``forward`` returns hidden states, ``logits`` projects chosen rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.project_in = nn.Linear(proj, cfg.hidden_size, bias=False) if proj != cfg.hidden_size else None
        self.project_out = nn.Linear(cfg.hidden_size, proj, bias=False) if proj != cfg.hidden_size else None
        self.layers = nn.ModuleList(OPTLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size) if cfg.do_layer_norm_before else None
        self.lm_head = nn.Linear(proj, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # OPT always ties

    def post_materialize(self) -> None:
        """Re-tie embeddings after the module moved off the meta device."""
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, ctx)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32) for hidden rows [N, hidden]."""
        return self.lm_head(hidden).float()

    def attention_weights(self, layer: int):
        """(Wq, bq, Wk, bk) of one layer, for offline analysis (InfiniGen)."""
        w = self.layers[layer].self_attn.qkv_proj
        n = self.cfg.num_heads * self.cfg.head_dim
        b = w.bias
        return w.weight[:n], None if b is None else b[:n], w.weight[n : 2 * n], None if b is None else b[n : 2 * n]

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF's OPTForCausalLM, fusing q/k/v."""
        sd = {k.removeprefix("model.").removeprefix("decoder."): v for k, v in sd.items()}
        own: dict[str, torch.Tensor] = {}
        for i in range(self.cfg.num_layers):
            p = f"layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                parts = [sd.get(f"{p}{n}_proj.{kind}") for n in ("q", "k", "v")]
                if all(t is not None for t in parts):
                    own[f"{p}qkv_proj.{kind}"] = torch.cat(parts, 0)
        for k, v in sd.items():
            if any(f".{n}_proj." in k for n in ("q", "k", "v")):
                continue
            own[k] = v
        if "lm_head.weight" not in own:
            own["lm_head.weight"] = own["embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"opt weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
