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
    per_layer = cfg.kv_bytes_per_token // cfg.num_layers
    # every decode step copies, per layer, the store's slots up to the sequence's last block
    # (the scratch block 0 included: it is part of the contiguous copy)
    last_block = -(-(len(prompt) + 3) // engine.config.block_size)  # block ids start at 1
    copied = (last_block + 1) * engine.config.block_size
    assert engine.stats().h2d_bytes == 3 * copied * cfg.kv_bytes_per_token
    # every new entry went to host memory once: the prompt's and the three decoded tokens'
    assert engine.stats().d2h_bytes == (len(prompt) + 3) * cfg.kv_bytes_per_token
    # on the device at once: one layer's gathered entries (the new one's slot included)
    assert engine.peak_kv_bytes() == (len(prompt) + 3) * per_layer
    assert engine.stats().kv_bytes_device == 0 and engine.stats().kv_bytes_host == 0


def test_infinigen_fetches_fewer_tokens_under_a_budget(smol_engine_factory, smol_prompts):
    cfg_budget = 0.25
    engine = smol_engine_factory("infinigen", policy_params={"alpha": 1e9, "kv_budget": cfg_budget})
    prompt = smol_prompts[1]
    engine.generate([prompt], 3)
    cfg = engine.model_config
    per_layer = cfg.kv_bytes_per_token // cfg.num_layers
    # first and last layers: every entry, gathered with the new token's slot
    exempt = 2 * sum(len(prompt) + i + 1 for i in range(2)) * per_layer
    speculated = (cfg.num_layers - 2) * sum(-(-int(cfg_budget * 100 * (len(prompt) + i)) // 100) for i in range(2))
    assert engine.stats().h2d_bytes == exempt + speculated * per_layer
