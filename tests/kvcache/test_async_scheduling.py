"""Asynchronous scheduling (the next step launched before this one's tokens are read back, its
input tokens fed on the device) changes when tokens are delivered, never which: every request
gets the same tokens as with synchronous steps, through admissions mid-run, requests ending at
different lengths or at EOS, eviction in place and preemption."""

from __future__ import annotations

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine

POLICIES = {"full": {}, "h2o": {"kv_budget": 0.4}, "streaming": {"kv_budget": 0.4, "sink_tokens": 2},
            "offload": {}, "infinigen": {"kv_budget": 0.4}}


def _workload(seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(prompt, max_tokens, the step at which it arrives) per request."""
    gen = torch.Generator().manual_seed(seed)
    lengths, outs, arrive = (9, 30, 21, 14, 5), (12, 7, 16, 10, 9), (0, 0, 3, 3, 8)
    return [(torch.randint(3, 512, (n,), generator=gen).tolist(), m, a)
            for n, m, a in zip(lengths, outs, arrive, strict=True)]


def _serve(engine: LLMEngine, workload, eos: int | None = None) -> tuple[dict[str, list[int]], int]:
    """Run the workload; returns each request's tokens and how many steps returned with a step
    still in flight (0 when scheduling is synchronous)."""
    if eos is not None:
        engine.model_config.eos_token_id = eos
    out: dict[str, list[int]] = {}
    finished: set[str] = set()
    step, overlapped = 0, 0
    while step == 0 or engine.has_unfinished():
        for i, (prompt, max_tokens, arrive) in enumerate(workload):
            if arrive == step:
                engine.add_request(str(i), prompt, max_tokens, ignore_eos=eos is None)
                out[str(i)] = []
        for o in engine.step():
            assert o.error is None and o.request_id not in finished
            out[o.request_id].extend(o.new_token_ids)
            if o.finished:
                finished.add(o.request_id)
        overlapped += engine._in_flight is not None and bool(engine.scheduler.running)
        step += 1
    assert finished == set(out)
    return out, overlapped


def _engine(policy: str, asynchronous: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny-llama", policy=policy, policy_params=POLICIES[policy], block_size=4,
                                  async_scheduling=asynchronous, **kw))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_tokens_as_synchronous_steps(policy):
    workload = _workload()
    sync, overlapped_sync = _serve(_engine(policy, False), workload)
    asyn, overlapped = _serve(_engine(policy, True), workload)
    assert overlapped_sync == 0 and overlapped > 10  # the steps really ran ahead
    assert asyn == sync
    assert [len(sync[str(i)]) for i in range(len(workload))] == [m for _, m, _ in workload]


def test_eos_ends_a_request_whose_next_step_is_already_launched():
    workload = _workload(1)
    plain, _ = _serve(_engine("full", False), workload)
    eos = plain["2"][5]  # a token request 2 emits mid-way (it ends there once EOS is honoured)
    sync, _ = _serve(_engine("full", False), workload, eos=eos)
    asyn, _ = _serve(_engine("full", True), workload, eos=eos)
    assert asyn == sync
    assert sync["2"][-1] == eos and len(sync["2"]) <= 6


def test_preemption_under_a_tight_budget():
    workload = [(p, 24, a) for p, _, a in _workload(2)]
    sync_engine, async_engine = _engine("full", False, kv_cache_blocks=20), _engine("full", True, kv_cache_blocks=20)
    sync, _ = _serve(sync_engine, workload)
    asyn, _ = _serve(async_engine, workload)
    assert sync_engine.scheduler.preemptions > 0 and async_engine.scheduler.preemptions > 0
    assert asyn == sync


def test_sampled_and_scored_requests_stay_synchronous():
    engine = _engine("full", True)
    tokens = _workload()[0][0]
    reference = _engine("full", False).score(tokens, 4)
    assert engine.score(tokens, 4) == reference
