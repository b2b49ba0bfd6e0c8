"""Typed configurations: what engine to build (EngineConfig) and the model's shape (ModelConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda", "meta")  # meta = dry run: shapes and accounting only, no memory


@dataclass
class EngineConfig:
    """Everything that decides which engine is built; load parameters live elsewhere."""

    model: str  # preset name, a HF folder (config.json) or a .gguf file
    weights: str = "dummy"  # real | dummy (seeded random weights)
    dtype: str = "float32"
    device: str = "cpu"
    policy: str = "full"
    policy_params: dict[str, Any] = field(default_factory=dict)
    kv_cache_bytes: int | None = None
    kv_cache_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 32
    max_model_len: int | None = None
    seed: int = 0
    max_num_batched_tokens: int = 4096  # padded prompt tokens per prefill step
    # kernels: 'auto' = Triton (paged decode, fused RMSNorm/RoPE) on a GPU, PyTorch reference elsewhere
    attention_backend: str = "auto"
    cuda_graphs: bool = True  # decode replays CUDA graphs (GPU, paged policies); False = eager
    # launch the next greedy step before reading this one's tokens back (None: on a GPU only,
    # where it hides the host's work between steps; the CPU's forward is synchronous anyway)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.weights not in ("real", "dummy"):
            raise ValueError(f"weights must be 'real' or 'dummy', got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size and max_num_seqs must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_blocks is not None:
            raise ValueError("give kv_cache_bytes or kv_cache_blocks, not both")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]


@dataclass
class ModelConfig:
    """The shape of a decoder-only model (Llama or OPT family), read from a HF config."""

    arch: str  # llama | opt
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    dtype_bytes: int = 4
    tie_word_embeddings: bool = False
    # llama
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # on the q/k/v projections
    o_proj_bias: bool = False  # llama's attention_bias covers o_proj too; qwen2 biases q/k/v only
    mlp_bias: bool = False
    # opt
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    activation: str = "relu"
    enable_bias: bool = True
    eos_token_id: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype_bytes: int = 4) -> ModelConfig:
        """Build from a HF ``config.json`` dict (model_type llama / mistral / qwen2-like, or opt)."""
        model_type = hf.get("model_type", "llama")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if model_type == "opt":
            hidden = hf["hidden_size"]
            heads = hf["num_attention_heads"]
            return cls(
                arch="opt",
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=hf["ffn_dim"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                dtype_bytes=dtype_bytes,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                word_embed_proj_dim=hf.get("word_embed_proj_dim", hidden),
                do_layer_norm_before=hf.get("do_layer_norm_before", True),
                activation=hf.get("activation_function", "relu"),
                enable_bias=hf.get("enable_bias", True),
                eos_token_id=eos,
            )
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}; allowed: llama, mistral, qwen2, opt")
        hidden = hf["hidden_size"]
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) not in ("default", None) else None
        return cls(
            arch="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            dtype_bytes=dtype_bytes,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=hf.get("attention_bias", model_type == "qwen2"),
            o_proj_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            eos_token_id=eos,
        )
