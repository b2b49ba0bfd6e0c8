"""Shared fixtures: SmolLM2-135M (real weights, converted once from the packaged GGUF) and its
reference outputs from transformers."""

from __future__ import annotations

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine
from backends.kvcache.loader import gguf_to_hf_folder, packaged_file
from backends.kvcache.presets import REAL_WEIGHTS

SMOL = "smollm2-135m"
TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "Water boils at a temperature of one hundred degrees Celsius when the pressure is",
]
NEW_TOKENS = 8


@pytest.fixture(scope="session")
def smol_dir():
    """The cached HF folder of SmolLM2-135M (converted from the GGUF on first use)."""
    return gguf_to_hf_folder(packaged_file(*REAL_WEIGHTS[SMOL]), SMOL)


@pytest.fixture(scope="session")
def smol_engine_factory(smol_dir):
    """Build engines on SmolLM2 real weights with any policy / budget."""

    def make(policy: str = "full", **kw) -> LLMEngine:
        return LLMEngine(EngineConfig(model=SMOL, weights="real", policy=policy, **kw))

    return make


@pytest.fixture(scope="session")
def smol_prompts(smol_dir):
    """Token ids of prompts of different lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="session")
def hf_smol(smol_dir):
    """SmolLM2-135M in transformers (the reference implementation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_smol, smol_prompts):
    """transformers' own greedy generate(), one prompt at a time (no padding effects)."""
    from transformers import GenerationConfig

    model = hf_smol
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = []
    with torch.inference_mode():
        for p in smol_prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            outs.append(out[0, len(p) :].tolist())
    return outs
