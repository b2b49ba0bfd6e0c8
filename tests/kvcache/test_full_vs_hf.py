"""`full` policy, greedy: the engine's tokens equal transformers' generate() on SmolLM2-135M."""

from __future__ import annotations

import torch

from tests.kvcache.conftest import NEW_TOKENS


def run_staggered(engine, prompts, arrivals, max_tokens):
    """Add request i at step arrivals[i]; step until done; return tokens per request."""
    out = {i: [] for i in range(len(prompts))}
    step = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], max_tokens)
        for o in engine.step():
            assert o.error is None, o.error
            out[int(o.request_id)].extend(o.new_token_ids)
        step += 1
    return [out[i] for i in range(len(prompts))]


def test_batch_matches_transformers_generate(smol_engine_factory, smol_prompts, hf_greedy):
    engine = smol_engine_factory("full")
    assert engine.generate(smol_prompts, NEW_TOKENS) == hf_greedy


def test_continuous_batching_with_preemption_matches(smol_engine_factory, smol_prompts, hf_greedy):
    # 8 blocks of 4 tokens (32 entries) cannot hold the four sequences at once: decode must preempt.
    engine = smol_engine_factory("full", kv_cache_blocks=8, block_size=4)
    tokens = run_staggered(engine, smol_prompts, arrivals=[0, 0, 2, 5], max_tokens=NEW_TOKENS)
    assert engine.stats().preemptions > 0
    assert tokens == hf_greedy
    assert engine.block_manager.num_used == 0  # everything returned


def test_score_equals_transformers_log_probs(smol_engine_factory, smol_prompts, hf_smol):
    ids = smol_prompts[1]
    prompt_len = 6
    got = smol_engine_factory("full").score(ids, prompt_len)
    with torch.inference_mode():
        logp = hf_smol(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [float(logp[i - 1, ids[i]]) for i in range(prompt_len, len(ids))]
    assert len(got) == len(ids) - prompt_len
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-3)
