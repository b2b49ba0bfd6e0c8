"""Policies configured to keep everything produce exactly `full`'s tokens; `offload` and
`infinigen` move the bytes they say they move."""

from __future__ import annotations

import pytest

from tests.kvcache.conftest import NEW_TOKENS

LOSSLESS = {
    "h2o": {"heavy_ratio": 0.5, "recent_ratio": 0.5},
    "infinigen": {"alpha": 1e9, "kv_budget": 1.0, "partial_weight_ratio": 0.3},
    "streaming": {"sink_tokens": 4, "window": 10_000},
    "offload": {},
}


@pytest.mark.parametrize("policy", sorted(LOSSLESS))
def test_keep_everything_equals_full(policy, smol_engine_factory, smol_prompts, hf_greedy):
    engine = smol_engine_factory(policy, policy_params=LOSSLESS[policy])
    assert engine.generate(smol_prompts, NEW_TOKENS) == hf_greedy  # == full's tokens (test_full_vs_hf)


def test_offload_fetches_every_stored_token_every_step(smol_engine_factory, smol_prompts):
    engine = smol_engine_factory("offload")
    prompt = smol_prompts[0]
    engine.generate([prompt], 4)
    cfg = engine.model_config
    # decode steps see prompt, prompt+1, prompt+2 stored tokens, in every layer
    tokens = sum(len(prompt) + i for i in range(3))
    assert engine.stats().h2d_bytes == tokens * cfg.kv_bytes_per_token
    # on the device at once: one layer's worth of the longest fetch; nothing is left afterwards
    assert engine.peak_kv_bytes() == (len(prompt) + 2) * cfg.kv_bytes_per_token // cfg.num_layers
    assert engine.stats().kv_bytes_device == 0 and engine.stats().kv_bytes_host == 0


def test_infinigen_fetches_fewer_tokens_under_a_budget(smol_engine_factory, smol_prompts):
    cfg_budget = 0.25
    engine = smol_engine_factory("infinigen", policy_params={"alpha": 1e9, "kv_budget": cfg_budget})
    prompt = smol_prompts[1]
    engine.generate([prompt], 3)
    cfg = engine.model_config
    per_layer = cfg.kv_bytes_per_token // cfg.num_layers
    exempt = 2 * sum(len(prompt) + i for i in range(2)) * per_layer  # first and last layers: everything
    speculated = (cfg.num_layers - 2) * sum(-(-int(cfg_budget * 100 * (len(prompt) + i)) // 100) for i in range(2))
    assert engine.stats().h2d_bytes == exempt + speculated * per_layer
