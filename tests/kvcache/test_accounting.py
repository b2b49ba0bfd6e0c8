"""Reported KV bytes = 2 x layers x kv_heads x head_dim x dtype bytes x tokens kept, for every
preset (meta device: the whole engine runs on shapes only, nothing is allocated)."""

from __future__ import annotations

import math

import pytest

from backends.kvcache import PRESETS, EngineConfig, LLMEngine

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPTS = [20, 37]


def bytes_per_token(hf: dict, dtype: str) -> int:
    """The formula, straight from the HF config fields."""
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", heads)
    head_dim = hf.get("head_dim", hf["hidden_size"] // heads)
    return 2 * hf["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def run_two_steps(policy: str, preset: str, dtype: str, **params):
    engine = LLMEngine(EngineConfig(model=preset, device="meta", dtype=dtype, policy=policy, policy_params=params))
    for i, n in enumerate(PROMPTS):
        engine.add_request(str(i), list(range(1, n + 1)), max_tokens=5)
    after_prefill = engine.step() and engine.stats()
    engine.step()
    return engine, after_prefill, engine.stats()


@pytest.mark.parametrize(
    "preset,dtype",
    [(p, "float32") for p in sorted(PRESETS)] + [("opt-13b", "float16"), ("llama-3.2-1b", "bfloat16")],
)
def test_full_kv_bytes(preset, dtype):
    engine, prefill, decode = run_two_steps("full", preset, dtype)
    per_token = bytes_per_token(PRESETS[preset], dtype)
    assert engine.model_config.kv_bytes_per_token == per_token
    assert prefill.kv_bytes_device == sum(PROMPTS) * per_token
    assert decode.kv_bytes_device == (sum(PROMPTS) + 2) * per_token
    assert decode.kv_bytes_host == 0 and decode.h2d_bytes == 0
    bs = engine.config.block_size
    assert decode.kv_blocks_used == sum(-(-(n + 1) // bs) for n in PROMPTS)


@pytest.mark.parametrize("preset", ["opt-6.7b", "llama-3-8b", "smollm2-135m"])
def test_h2o_and_offload_kv_bytes(preset):
    per_token = bytes_per_token(PRESETS[preset], "float16")
    _, _, h2o = run_two_steps("h2o", preset, "float16", kv_budget=0.2)
    kept = sum(math.floor(0.2 * (n + 1) + 1e-9) for n in PROMPTS)
    assert h2o.kv_bytes_device == kept * per_token
    _, _, off = run_two_steps("offload", preset, "float16")
    assert off.kv_bytes_host == (sum(PROMPTS) + 2) * per_token
    # the decode step copied, per layer, the store's slots up to the last block held (blocks 1-5
    # for 20 + 37 entries, block 0 is scratch); one layer's gathered batch [2, 38] was resident
    assert off.h2d_bytes == 6 * 16 * per_token
    assert off.d2h_bytes == (sum(PROMPTS) + 2) * per_token
    assert off.kv_bytes_device == 2 * 38 * per_token // PRESETS[preset]["num_hidden_layers"]
