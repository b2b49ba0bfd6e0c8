"""A burst of 200 requests on a tiny model: the KV budget is never exceeded, overload queues
(with preemptions) instead of crashing, and every request completes or gets an error."""

from __future__ import annotations

import random

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine

MAX_MODEL_LEN = 96


@pytest.fixture(autouse=True)
def one_thread():
    """A 2-layer, 64-wide model is all Python overhead: extra threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("policy", ["full", "h2o", "offload"])
def test_burst_of_200_requests(policy):
    engine = LLMEngine(
        EngineConfig(
            model="tiny-llama", policy=policy, kv_cache_blocks=24, block_size=8, max_num_seqs=16,
            max_model_len=MAX_MODEL_LEN, policy_params={"kv_budget": 0.5} if policy == "h2o" else {},
        )
    )
    rng = random.Random(0)
    budget_bytes = engine.kv_budget_bytes
    wanted: dict[str, int] = {}
    for i in range(200):
        prompt_len = rng.randint(1, 60)
        max_tokens = rng.randint(1, 40)  # some exceed max_model_len: those must error
        wanted[str(i)] = max_tokens
        engine.add_request(str(i), [rng.randrange(3, 500) for _ in range(prompt_len)], max_tokens)
    engine.add_request("empty", [], 4)
    tokens: dict[str, int] = {}
    errors: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.error:
                errors[o.request_id] = o.error
            else:
                tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.new_token_ids)
        s = engine.stats()
        assert s.kv_blocks_used <= 24
        # the budget bounds the store: on the device, or in host memory for offload
        assert (s.kv_bytes_host if policy == "offload" else s.kv_bytes_device) <= budget_bytes
        assert s.running <= 16
        steps += 1
        assert steps < 20_000
    assert "empty" in errors
    assert errors, "over-long requests must be reported"
    assert all("max_model_len" in e for k, e in errors.items() if k != "empty")
    for rid, n in wanted.items():
        assert (rid in errors) != (tokens.get(rid) == n), rid  # exactly one of: all tokens, or an error
    assert engine.stats().preemptions > 0 or policy == "h2o"
    assert engine.block_manager.num_used == 0 and engine.block_manager.peak_used <= 24
