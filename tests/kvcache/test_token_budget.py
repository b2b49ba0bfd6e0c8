"""Budgets a user can state: a token count per sequence and a floor below which nothing is
evicted, besides the fraction of tokens seen (SmolLM2-135M, real weights, greedy)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from backends.kvcache.policies.registry import POLICIES

SHORT = "In the beginning God created"
NEW = 10


@pytest.fixture(scope="module")
def short_prompt(smol_dir) -> list[int]:
    return AutoTokenizer.from_pretrained(str(smol_dir)).encode(SHORT, add_special_tokens=False)


@pytest.fixture(scope="module")
def full_output(smol_engine_factory, short_prompt) -> list[int]:
    return smol_engine_factory("full").generate([short_prompt], NEW)[0]


def test_fraction_alone_changes_a_short_prompt(smol_engine_factory, short_prompt, full_output):
    # the problem the floor solves: a quarter of 5 tokens is one token
    assert smol_engine_factory("h2o", policy_params={"kv_budget": 0.25}).generate([short_prompt], NEW)[0] != full_output


@pytest.mark.parametrize("policy, params", [
    ("h2o", {"kv_budget_tokens": 32}),
    ("streaming", {"kv_budget": 0.25, "min_tokens": 32}),
    ("infinigen", {"kv_budget": 0.25, "min_tokens": 32}),
])
def test_short_prompt_under_the_floor_decodes_as_full(smol_engine_factory, short_prompt, full_output, policy, params):
    assert len(short_prompt) + NEW < 32
    out = smol_engine_factory(policy, policy_params=params).generate([short_prompt], NEW)[0]
    assert out == full_output


@pytest.mark.parametrize("policy, params, kept", [
    ("h2o", {"heavy_tokens": 4, "recent_tokens": 6}, 10),
    ("streaming", {"kv_budget_tokens": 12, "sink_tokens": 4}, 12),
    ("h2o", {"kv_budget": 0.1, "min_tokens": 20}, 20),  # the floor holds once the fraction falls below it
])
def test_long_prompt_is_capped_at_the_stated_count(smol_engine_factory, smol_prompts, policy, params, kept):
    engine = smol_engine_factory(policy, policy_params=params)
    prompt = smol_prompts[1] * 3  # ~60 tokens
    engine.add_request("long", prompt, 6)
    stored = []
    while engine.has_unfinished():
        engine.step()
        seq = engine._seqs.get("long")
        if seq is not None and seq.num_seen > 0:
            stored.append(seq.num_stored)
    assert stored and all(n == kept for n in stored), stored


@pytest.mark.parametrize("policy, params, message", [
    ("h2o", {"kv_budget": 0.2, "kv_budget_tokens": 8}, "give kv_budget (a fraction) or kv_budget_tokens"),
    ("h2o", {"heavy_ratio": 0.1, "recent_tokens": 8}, "fractions (heavy_ratio) or as token counts (recent_tokens)"),
    ("h2o", {"kv_budget_tokens": 8, "heavy_tokens": 4}, "give kv_budget_tokens or heavy_tokens, not both"),
    ("streaming", {"kv_budget_tokens": 0}, "kv_budget_tokens: Input should be greater than or equal to 1"),
    ("full", {"min_tokens": -1}, "min_tokens: Input should be greater than or equal to 0"),
])
def test_budget_errors_are_one_line(policy, params, message):
    with pytest.raises(ValueError) as err:
        POLICIES[policy].params_model.resolve(policy, params)
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith(f"policy {policy!r}: ")
