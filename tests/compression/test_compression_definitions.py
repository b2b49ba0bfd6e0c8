"""Compressors against their definitions, in one process."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.compression import (
    COMPRESSORS,
    Communicator,
    CompressContext,
    CompressionConfig,
    GradientSync,
    ResidualMemory,
    build_compressor,
)
from backends.compression.a2sgd import count_ones, expand_means
from backends.compression.topk import topk_count


def _ctx(t: torch.Tensor, world_size: int = 1) -> CompressContext:
    return CompressContext(shape=t.shape, dtype=t.dtype, world_size=world_size)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 2**16))
def test_topk_keeps_exactly_the_k_largest_magnitudes(n: int, ratio: float, seed: int) -> None:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed))  # ties have probability 0
    comp = build_compressor(CompressionConfig(name="topk", ratio=ratio))
    values, indices = comp.compress(g, _ctx(g))
    k = topk_count(n, ratio)
    assert values.numel() == indices.numel() == k == min(n, max(1, math.ceil(ratio * n)))
    assert values.dtype == torch.float32 and indices.dtype == torch.int32
    expected = set(torch.argsort(g.abs(), descending=True)[:k].tolist())
    assert set(indices.tolist()) == expected
    out = comp.decompress([values, indices], _ctx(g))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[list(expected)] = True
    assert torch.equal(out[kept], g[kept]) and torch.all(out[~kept] == 0)


@pytest.mark.parametrize("levels,bucket", [(1, 64), (4, 32), (127, 128)])
def test_qsgd_is_unbiased_and_meets_its_variance_bound(levels: int, bucket: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(300) * torch.rand(300) * 3
    comp = build_compressor(CompressionConfig(name="qsgd", levels=levels, bucket_size=bucket), seed=1)
    draws = 4000
    samples = torch.stack([comp.decompress(comp.compress(x, _ctx(x)), _ctx(x)) for _ in range(draws)])
    # Unbiased: each coordinate's sample mean lies within 5 standard errors of x_i
    # (per-coordinate variance <= (norm/s)^2 / 4 for a two-point rounding), plus float slack.
    pad = (-x.numel()) % bucket
    norms = torch.nn.functional.pad(x, (0, pad)).view(-1, bucket).norm(dim=1)
    step = norms.repeat_interleave(bucket)[: x.numel()] / levels
    stderr = step / 2 / math.sqrt(draws)
    assert torch.all((samples.mean(0) - x).abs() <= 5 * stderr + 1e-6)
    # Variance bound per bucket of d elements: E||Q(x)-x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2.
    err = (samples - x).pow(2)
    err = torch.nn.functional.pad(err, (0, pad)).view(draws, -1, bucket).sum(2).mean(0)
    bound = min(bucket / levels**2, math.sqrt(bucket) / levels) * norms.pow(2)
    assert torch.all(err <= bound * 1.05 + 1e-9)


def test_qsgd_payload_is_one_byte_per_element_plus_a_norm_per_bucket() -> None:
    x = torch.randn(1000)
    comp = build_compressor(CompressionConfig(name="qsgd", levels=127, bucket_size=128))
    signed, norms = comp.compress(x, _ctx(x))
    assert signed.dtype == torch.int8 and signed.numel() == 1024
    assert norms.dtype == torch.float32 and norms.numel() == 8
    assert signed.abs().max() <= 127


@pytest.mark.parametrize("threshold", ["zero", "mean"])
@pytest.mark.parametrize("residual", ["global", "local"])
def test_a2sgd_payload_is_two_scalars_and_v_equals_u_plus_e(residual: str, threshold: str) -> None:
    torch.manual_seed(0)
    config = CompressionConfig(name="a2sgd", residual=residual, threshold=threshold)
    sync = GradientSync(build_compressor(config), Communicator())
    e_prev = torch.zeros(500)
    for _ in range(5):
        g = torch.randn(500) + 0.3
        v = g + e_prev
        ctx = _ctx(v)
        payload = sync.compressor.compress(v, ctx)
        assert len(payload) == 1 and payload[0].numel() == 2 and payload[0].dtype == torch.float32
        cut = v.mean() if threshold == "mean" else 0.0
        assert torch.allclose(payload[0], torch.stack([v[v >= cut].mean(), v[v < cut].mean()]))
        u = sync.sync("w", g)
        assert set(torch.unique(u).tolist()) <= set(payload[0].tolist())
        e = sync.memory.residuals["w"]
        assert torch.allclose(v, u + e, atol=1e-6)  # one worker: global and local means coincide
        e_prev = e
    assert sync.take_stats().payload_bytes == 5 * 8


@pytest.mark.parametrize("threshold", ["zero", "mean"])
def test_a2sgd_means_are_exact_at_ptb_medium_size_even_with_one_element_on_a_side(threshold: str) -> None:
    # 20M elements, the PTB-medium LSTM's size, on one CPU thread (as training workers run)
    compressor = build_compressor(CompressionConfig(name="a2sgd", threshold=threshold))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        skewed = torch.randn(20_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3 + 3e-4
        lonely = -torch.rand(20_000_000, generator=torch.Generator().manual_seed(1)) * 1e-2
        lonely[0] = 1.0  # P holds this element alone (it is above the mean too)
        for v in (skewed, lonely):
            cut = v.double().mean() if threshold == "mean" else 0.0
            mask = v.double() >= cut
            expected = torch.stack([v.double()[mask].mean(), v.double()[~mask].mean()])
            (means,) = compressor.compress(v, _ctx(v))
            assert torch.allclose(means.double(), expected, rtol=1e-5, atol=0), (means, expected)
    finally:
        torch.set_num_threads(threads)


def test_a2sgd_counts_past_fp32s_exact_integers_exactly() -> None:
    mask = torch.ones(2**24 + 4101)  # past 2^24, and a tail shorter than a block
    mask[::97] = 0.0
    mask[-3:] = torch.tensor([0.0, 1.0, 0.0])
    count = count_ones(mask)
    assert count.dtype == torch.float64 and int(count) == int(mask.to(torch.int64).sum())


@pytest.mark.parametrize("as_bool", [False, True])
def test_a2sgd_update_holds_exactly_the_two_means(as_bool: bool) -> None:
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    means = torch.tensor([1e-8, -1e-3])  # the sum-and-difference shortcut loses the small one
    u = expand_means(mask.bool() if as_bool else mask, means)
    assert u.tolist() == [means[0].item(), means[1].item(), means[0].item(), means[1].item(), means[1].item()]


@pytest.mark.parametrize("name", sorted(set(COMPRESSORS) - {"powersgd"}))
def test_error_feedback_identity_holds_for_every_compressor(name: str) -> None:
    """With feedback on: g_t + e_{t-1} = reference_t + e_t, so sum(g) = sum(reference) + e_T."""
    torch.manual_seed(1)
    sync = GradientSync(
        build_compressor(CompressionConfig(name=name, error_feedback=True, ratio=0.05)),
        Communicator(),
        ResidualMemory(),
    )
    grads, refs = torch.zeros(257), torch.zeros(257)
    e_prev = torch.zeros(257)
    for _ in range(6):
        g = torch.randn(257)
        out = sync.sync("p", g)
        e = sync.memory.residuals["p"]
        assert torch.allclose(g + e_prev, out + e, atol=1e-5)
        grads += g
        refs += out
        e_prev = e
    assert torch.allclose(grads, refs + e_prev, atol=1e-4)


def test_unknown_compressor_is_rejected_with_the_allowed_names() -> None:
    with pytest.raises(ValueError, match="allowed"):
        build_compressor(CompressionConfig(name="zip"))


def test_a_new_compressor_module_is_registered_by_importing_the_package(tmp_path) -> None:
    """Adding a compressor is adding one module: no import list to extend."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "backends", tmp_path / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "backends" / "compression" / "zero.py").write_text(
        "from backends.compression.base import COMPRESSORS\n"
        "from backends.compression.dense import DenseCompressor\n\n\n"
        "@COMPRESSORS.register\nclass ZeroCompressor(DenseCompressor):\n    name = 'zero'\n"
    )
    code = "import backends.compression as c; print(','.join(sorted(c.COMPRESSORS)))"
    # the copy first; what else is on the path stays (a node without a venv has its packages there)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": path},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == sorted([*COMPRESSORS, "zero"])


def test_the_grid_compressor_section_is_the_backend_config() -> None:
    """One declaration of the knobs: the training grid validates against CompressionConfig itself."""
    from pydantic import ValidationError

    from workloads.training.params import TrainingParams

    params = TrainingParams.model_validate({"compressor": {"name": "topk", "ratio": 0.001}})
    assert type(params.compressor) is CompressionConfig and params.compressor.ratio == 0.001
    with pytest.raises(ValidationError, match="ratio"):
        TrainingParams.model_validate({"compressor": {"name": "topk", "ratio": 0}})
    with pytest.raises(ValidationError, match="DDP hook"):
        TrainingParams.model_validate({"compressor": {"name": "powersgd", "mode": "flat"}})
