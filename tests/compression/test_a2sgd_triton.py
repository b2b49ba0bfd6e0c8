"""A2SGD's one-pass Triton partition against the PyTorch expression and a float64 reference.
Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from backends.compression import CompressContext, CompressionConfig, build_compressor
from backends.compression.a2sgd import partition_means_torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gradient(kind: str, n: int, seed: int) -> torch.Tensor:
    """A gradient of n elements: normal, one-signed, one positive element among negatives, or
    with many elements exactly at zero (ties with the threshold go to the positive side)."""
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-2
    if kind == "ties":
        return (v * 100).round() / 100
    if kind == "positive":
        return v.abs() + 1e-4
    if kind == "negative":
        return -v.abs() - 1e-4
    if kind == "lonely":
        v = -v.abs() - 1e-4
        v[n // 3] = 1.0
    return v


@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 3 * 4096 + 5, 50_000])
@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "lonely", "ties"])
@pytest.mark.parametrize("threshold", ["zero", "mean"])
def test_one_pass_partition_matches_the_pytorch_expression(n: int, kind: str, threshold: str) -> None:
    from backends.compression.a2sgd_triton import partition_means

    v = _gradient(kind, n, seed=n)
    cut = v.double().mean() if threshold == "mean" else torch.tensor(0.0, dtype=torch.float64)
    mask, means = partition_means(v.to(DEVICE), cut.float().to(DEVICE))
    expected_mask, expected_means = partition_means_torch(v, cut.float())
    expected_mask = expected_mask.bool()  # the PyTorch path's mask is 0/1 float, the kernel's bool
    assert torch.equal(mask.cpu(), expected_mask)
    reference = v.double()
    exact = torch.stack([reference[expected_mask].sum() / max(int(expected_mask.sum()), 1),
                         reference[~expected_mask].sum() / max(int((~expected_mask).sum()), 1)])
    assert torch.allclose(means.cpu().double(), exact, rtol=1e-5, atol=1e-12), (means, exact)
    assert torch.allclose(means.cpu(), expected_means, rtol=1e-5, atol=1e-12)


def test_the_compressor_on_this_device_gives_the_cpu_compressors_update() -> None:
    # on a GPU this is the Triton path against the CPU one; without a GPU both are PyTorch
    compressor = build_compressor(CompressionConfig(name="a2sgd", threshold="mean"))
    v = _gradient("normal", 3 * 4096 + 5, seed=3)
    updates = []
    for device in ("cpu", DEVICE):
        ctx = CompressContext(shape=v.shape, dtype=v.dtype, world_size=2)
        updates.append(compressor.decompress(compressor.compress(v.to(device), ctx), ctx).cpu())
    assert torch.allclose(updates[0], updates[1], rtol=1e-5, atol=0)
    assert torch.equal(updates[0] == updates[0].max(), updates[1] == updates[1].max())
