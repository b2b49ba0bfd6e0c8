"""Device memory and transfers are counted from what is allocated and copied: the store's
allocation counter, its growth, and host<->device bytes of the copies issued (meta and CPU)."""

from __future__ import annotations

import torch

from backends.kvcache import EngineConfig, LLMEngine
from backends.kvcache.kv_store import PagedKVStore


def _store(host: bool = False) -> PagedKVStore:
    engine = LLMEngine(EngineConfig(model="smollm2-135m", device="meta", dtype="bfloat16"))
    return PagedKVStore(engine.model_config, num_blocks=64, block_size=16, device=torch.device("cpu"),
                        dtype=torch.bfloat16, host_resident=host)


def test_store_counts_its_allocations_and_growth_peak():
    store = _store()
    start = store.bytes_allocated()
    assert store.memory.current == start > 0
    store.ensure_blocks([20])
    assert store.capacity_blocks == 21
    now = store.bytes_allocated()
    assert store.memory.current == now
    # tensors grow one at a time: the old K coexisted with the new K (and the old V) during its copy
    assert store.memory.peak == now + start // 2
    store.memory.reset_peak()
    assert store.memory.peak == now


def test_host_store_counts_transfers_not_device_memory():
    store = _store(host=True)
    assert store.memory.current == 0  # host memory is not device memory
    k = torch.randn(5, *store.k.shape[2:]).to(torch.bfloat16)
    store.write(3, torch.arange(16, 21), k, k.clone())
    assert store.transfers.d2h == 2 * k.numel() * 2
    rows = store.k[3, :32]
    out = store.to_device(rows, torch.device("cpu"))
    assert torch.equal(out[16:21], k)
    assert store.transfers.h2d == rows.numel() * 2


def _decode(policy: str, steps: int, **params) -> LLMEngine:
    # The store's growth is the policy's, whatever the shape: a 2-layer one decodes 10x faster on meta.
    engine = LLMEngine(EngineConfig(model="tiny-llama", device="meta", dtype="bfloat16", policy=policy,
                                    policy_params=params))
    for i in range(2):
        engine.add_request(str(i), list(range(1, 41)), max_tokens=steps)
    while engine.has_unfinished():
        engine.step()
    return engine


def test_an_evicting_policy_allocates_less_than_full():
    full, h2o = _decode("full", 120), _decode("h2o", 120, kv_budget=0.2)
    # full's store grew with the sequences (2 x 160 entries); h2o's held at most the prompts'
    assert h2o.store.capacity_blocks < full.store.capacity_blocks
    assert h2o.store.memory.peak < 0.7 * full.store.memory.peak
    assert full.store.memory.peak >= 2 * 160 * full.model_config.kv_bytes_per_token
