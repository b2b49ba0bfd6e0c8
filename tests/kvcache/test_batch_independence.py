"""A request's output does not depend on what else was batched with it: every policy gives a
short prompt the same tokens alone and prefilled next to longer ones (each prompt attends only
to itself, so padding can no longer leak attention mass into H2O's scores), and a one-entry
eviction in place keeps exactly the entries a full compaction keeps."""

from __future__ import annotations

import pytest
import torch

from backends.kvcache import POLICIES, EngineConfig, LLMEngine
from tests.kvcache.conftest import NEW_TOKENS

BUDGETED = {"h2o": {"kv_budget": 0.3}, "streaming": {"kv_budget": 0.3, "sink_tokens": 2},
            "infinigen": {"kv_budget": 0.3}}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_tokens_do_not_depend_on_batch_mates(policy, smol_engine_factory, smol_prompts):
    short, longer = smol_prompts[0], smol_prompts[1:]
    alone = smol_engine_factory(policy, policy_params=BUDGETED.get(policy, {})).generate([short], NEW_TOKENS)[0]
    mixed = smol_engine_factory(policy, policy_params=BUDGETED.get(policy, {})).generate([*longer, short], NEW_TOKENS)
    assert mixed[-1] == alone


@pytest.mark.parametrize("policy,params", [("h2o", {"kv_budget": 0.4}), ("streaming", {"kv_budget": 0.4, "sink_tokens": 2})])
def test_drop_in_place_keeps_what_compaction_keeps(policy, params, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (9, 30, 21)]

    def kept(in_place: bool):
        cls = POLICIES[policy]
        monkeypatch.setattr(cls, "evicts_in_place", lambda self: in_place)
        eng = LLMEngine(EngineConfig(model="tiny-llama", policy=policy, policy_params=params, block_size=4))
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, 12)
        for _ in range(8):
            eng.step()
        # as sets: an in-place drop reorders entries
        return [[[sorted(eng.kept_positions(str(i))[layer, :, h].tolist()) for h in range(2)] for layer in range(2)]
                for i in range(len(prompts))], [eng._seqs[str(i)].num_stored for i in range(len(prompts))]

    assert kept(True) == kept(False)
