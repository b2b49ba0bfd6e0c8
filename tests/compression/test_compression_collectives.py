"""Compressors over real gloo process groups (2-4 CPU processes): results and counted bytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from backends.compression import (
    COMPRESSORS,
    Communicator,
    CompressionConfig,
    GradientSync,
    build_applier,
    build_compressor,
)
from workloads.training.local import spawn_gloo_group as run_group

N = 1000
FLAT = sorted(set(COMPRESSORS) - {"powersgd"})


def _ring(nbytes: int, p: int) -> int:
    return round(2 * (p - 1) / p * nbytes)


def expected_bytes(name: str, n: int, p: int, config: CompressionConfig) -> int:
    """Analytic bytes one worker sends per step (the counting model in communicator.py)."""
    if name == "dense":
        return _ring(4 * n, p)
    if name == "fp16":
        return _ring(2 * n, p)
    if name == "topk":
        k = max(1, math.ceil(config.ratio * n))
        return (p - 1) * (4 * k + 4 * k)
    if name == "qsgd":
        buckets = math.ceil(n / config.bucket_size)
        return (p - 1) * (buckets * config.bucket_size * 1 + 4 * buckets)
    if name == "a2sgd":
        return _ring(8, p)
    raise AssertionError(name)


def _all_workers(rank: int, world_size: int) -> dict:
    """One process group per world size runs every case (spawning dominates the test's time)."""
    return {"flat": _flat_worker(rank), "powersgd": _powersgd_worker(rank), "hook": _hook_worker(rank)}


@pytest.fixture(scope="module", params=[2, 3, 4])
def group(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_group(request.param, _all_workers)


def _flat_worker(rank: int) -> dict:
    out = {}
    for name in FLAT:
        config = CompressionConfig(name=name, ratio=0.01)
        sync = GradientSync(build_compressor(config, rank, seed=3), Communicator())
        g = torch.randn(N, generator=torch.Generator().manual_seed(100 * rank + 7))
        result = sync.sync("w", g)
        stats = sync.take_stats()
        residual = getattr(sync.memory, "residuals", {}).get("w")
        out[name] = {"g": g, "result": result, "stats": stats, "residual": residual}
    return out


def test_flat_sync_results_and_counted_bytes_match_the_definitions(group: tuple[int, list[dict]]) -> None:
    world_size, ranks = group[0], [r["flat"] for r in group[1]]
    grads = torch.stack([r["dense"]["g"] for r in ranks])
    for name in FLAT:
        config = CompressionConfig(name=name, ratio=0.01)
        for r in ranks:
            stats = r[name]["stats"]
            assert stats.bytes_sent == stats.bytes_recv == expected_bytes(name, N, world_size, config), name
        if name != "a2sgd":  # every other compressor yields the same averaged tensor on every rank
            for r in ranks[1:]:
                assert torch.allclose(r[name]["result"], ranks[0][name]["result"], atol=1e-6), name
    assert torch.allclose(ranks[0]["dense"]["result"], grads.mean(0), atol=1e-6)
    assert torch.allclose(ranks[0]["fp16"]["result"], grads.half().float().sum(0) / world_size, atol=1e-2)
    # topk: the average of each worker's k largest (no residual yet, so v = g).
    k = math.ceil(0.01 * N)
    sparse = torch.zeros_like(grads)
    for i, g in enumerate(grads):
        idx = g.abs().topk(k).indices
        sparse[i, idx] = g[idx]
    assert torch.allclose(ranks[0]["topk"]["result"], sparse.mean(0), atol=1e-6)
    # a2sgd: global means of the local means, spread over each rank's own sign pattern; v = u + e.
    pos = torch.stack([g[g >= 0].mean() for g in grads]).mean()
    neg = torch.stack([g[g < 0].mean() for g in grads]).mean()
    for r in ranks:
        g, u = r["a2sgd"]["g"], r["a2sgd"]["result"]
        assert torch.allclose(u, torch.where(g >= 0, pos, neg), atol=1e-6)
        assert torch.allclose(g, u + r["a2sgd"]["residual"], atol=1e-6)
        assert r["a2sgd"]["stats"].payload_bytes == 8


def _powersgd_worker(rank: int) -> list[dict]:
    torch.manual_seed(0)  # same initial weights everywhere
    model = torch.nn.Linear(32, 16, bias=False)
    reference = torch.nn.Linear(32, 16, bias=False)
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model)
    config = CompressionConfig(name="powersgd", rank=1, start_iter=2)
    applier = build_applier(config, ddp)
    steps = []
    error = torch.zeros(16 * 32)
    for step in range(4):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1000 * rank + step))
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        reference.zero_grad()
        reference(x).pow(2).sum().backward()
        local = reference.weight.grad.reshape(-1).clone()
        stats = applier.take_stats()
        new_error = applier.compressor.state.error_dict.get(0, torch.zeros(0)).clone()
        steps.append(
            {"local": local, "prev_error": error, "grad": model.weight.grad.reshape(-1).clone(),
             "error": new_error, "bytes": stats.bytes_sent}
        )
        if new_error.numel():
            error = new_error
    return steps


def test_powersgd_hook_counts_bytes_and_keeps_the_error_feedback_identity(group: tuple[int, list[dict]]) -> None:
    world_size, ranks = group[0], [r["powersgd"] for r in group[1]]
    for r in ranks:
        for step, rec in enumerate(r):
            compressed = step >= 2
            payload = 4 * ((16 + 32) * 1 if compressed else 16 * 32)
            assert rec["bytes"] == _ring(payload, world_size)
            if compressed:  # v = g + e_prev = result + e
                assert torch.allclose(rec["local"] + rec["prev_error"], rec["grad"] + rec["error"], atol=1e-4)
    for step in range(4):
        for r in ranks[1:]:
            assert torch.allclose(r[step]["grad"], ranks[0][step]["grad"], atol=1e-5)


def _hook_worker(rank: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.Linear(10, 1))
    ddp = DistributedDataParallel(model)
    applier = build_applier(CompressionConfig(name="topk", ratio=0.1, mode="hook"), ddp)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(rank))
    ddp(x).sum().backward()
    return {"stats": applier.take_stats(), "grad": [p.grad.clone() for p in model.parameters()]}


def test_ddp_hook_mode_syncs_buckets_and_counts_their_bytes(group: tuple[int, list[dict]]) -> None:
    world_size, ranks = group[0], [r["hook"] for r in group[1]]
    n = 20 * 10 + 10 + 10 + 1  # one bucket holds every parameter
    k = math.ceil(0.1 * n)
    for r in ranks:
        assert r["stats"].bytes_sent == (world_size - 1) * 8 * k
    for r in ranks[1:]:
        for a, b in zip(ranks[0]["grad"], r["grad"], strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert sum(int((g != 0).sum()) for g in ranks[0]["grad"]) <= world_size * k
