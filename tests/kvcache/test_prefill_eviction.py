"""Evicting policies select inside the prefill, layer by layer: a burst of prompts stores only
what the budget keeps (plus one layer of the prompts, in flight), not every prompt's whole K/V
until the step ends."""

from __future__ import annotations

import math

import pytest

from backends.kvcache import EngineConfig, LLMEngine

BUDGET = 0.2


def _burst(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, max_tokens)
    first = True
    while engine.has_unfinished():
        outs = engine.step()
        if first:  # every prompt was admitted into the first step
            assert engine.stats().running == len(prompts)
            first = False
        for o in outs:
            out[o.request_id].extend(o.new_token_ids)
    return out


@pytest.mark.parametrize("policy", ["h2o", "streaming"])
def test_burst_of_prompts_holds_about_the_budget(policy, smol_engine_factory, smol_prompts):
    prompts = [(p * 40)[: 150 + 10 * i] for i, p in enumerate(smol_prompts)]  # 150-180 tokens each
    full = smol_engine_factory("full")
    lossy = smol_engine_factory(policy, policy_params={"kv_budget": BUDGET})
    _burst(full, prompts, 3)
    _burst(lossy, prompts, 3)
    cfg = full.model_config
    per_token = cfg.kv_bytes_per_token
    seen = sum(len(p) for p in prompts)
    assert full.peak_kv_bytes() >= seen * per_token  # full stored every prompt entry
    # what the budget keeps of each prompt (+1: the decode step's new entry before its drop),
    # and one layer of every prompt of the step while the layer selects
    kept = sum(lossy.policy.kept_tokens(len(p)) + 1 for p in prompts) * per_token
    in_flight = seen * per_token // cfg.num_layers
    assert lossy.peak_kv_bytes() <= kept + in_flight
    assert lossy.peak_kv_bytes() >= sum(math.floor(BUDGET * len(p)) for p in prompts) * per_token
    assert lossy.peak_kv_bytes() / full.peak_kv_bytes() < BUDGET + 1 / cfg.num_layers + 0.02


def test_store_blocks_follow_what_a_prefill_keeps():
    """On the dry-run device the store grows only to the blocks of the kept entries (what a GPU
    allocates): 8 prompts of 256 tokens at budget 0.2 take a quarter of full's store."""
    def run(policy: str, **params) -> LLMEngine:
        engine = LLMEngine(EngineConfig(model="llama-3-8b", device="meta", dtype="bfloat16", policy=policy,
                                        policy_params=params))
        _burst(engine, [list(range(1, 257))] * 8, 2)
        return engine

    full, h2o = run("full"), run("h2o", kv_budget=BUDGET)
    bs = full.config.block_size
    assert full.store.capacity_blocks >= 8 * 256 // bs
    kept_blocks = 8 * -(-(h2o.policy.kept_tokens(256) + 1) // bs)
    assert h2o.block_manager.peak_used == kept_blocks  # (full's prompts alone need 128)
    assert h2o.store.capacity_blocks <= 1.25 * (kept_blocks + 1)  # (+1: the scratch block; grows by 1/4)
    assert h2o.store.memory.peak < 0.3 * full.store.memory.peak


def test_prompt_shorter_than_the_floor_keeps_everything(smol_engine_factory, smol_prompts):
    """With ``min_tokens`` above the prompt, the prefill stores the whole prompt and the output
    is the full cache's."""
    prompt = smol_prompts[1]
    full = smol_engine_factory("full").generate([prompt], 6)
    for policy in ("h2o", "streaming"):
        engine = smol_engine_factory(policy, policy_params={"kv_budget": BUDGET, "min_tokens": 64})
        assert engine.policy.prefill_stored(len(prompt)) == len(prompt)
        assert engine.generate([prompt], 6) == full, policy

