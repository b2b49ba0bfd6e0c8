"""Compress + decompress time per step for each compressor, in units of one memory pass.

For n = 20M and 100M fp32 gradient elements, times (median of ``--repeats``) on one device:
- ``pass``: one memory pass over the gradient, ``out.copy_(g)`` (reads 4n bytes, writes 4n),
  measured in the same run: the unit of every ratio below;
- ``codec``: compress(v) then decompress(payload) (what a worker adds to a step besides the
  collective and error feedback);
- ``sync``: the whole GradientSync on one worker (error feedback + codec; the collective is a
  no-op at p = 1).
PowerSGD is not listed: it runs only inside PyTorch's DDP hook, interleaved with its collectives.
On a GPU a2sgd partitions v in one Triton pass; the row ``a2sgd-ops`` is the same codec in
PyTorch operations (what a CPU runs), measured in the same run for comparison.
Goal for a2sgd: codec <= 4 passes. Runs without Ray, also on a CUDA machine:

    .venv/bin/python -m benchmarks.bench_compression [--device cuda] [--sizes 20e6 100e6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

from backends.compression import (
    Communicator,
    CompressContext,
    CompressionConfig,
    GradientSync,
    build_compressor,
)
from backends.compression.a2sgd import expand_means, partition_means_torch
from backends.triton_support import triton_usable

COMPRESSORS = ("dense", "fp16", "topk", "qsgd", "a2sgd")
CONFIG = {"ratio": 0.001, "levels": 127, "bucket_size": 128}


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench(n: int, device: torch.device, repeats: int) -> list[dict[str, float | str]]:
    """Rows (compressor, codec_s, sync_s, ratios to one pass) for gradients of n elements."""
    g = torch.randn(n, device=device)
    out = torch.empty_like(g)
    pass_s = _time(lambda: out.copy_(g), device, repeats)
    rows: list[dict[str, float | str]] = [{"compressor": "pass", "codec_s": pass_s, "codec_passes": 1.0}]
    for name in COMPRESSORS:
        config = CompressionConfig(name=name, **CONFIG)
        compressor = build_compressor(config)
        ctx = CompressContext(shape=g.shape, dtype=g.dtype, world_size=1)
        codec_s = _time(lambda c=compressor, x=ctx: c.decompress(c.compress(g, x), x), device, repeats)
        sync = GradientSync(compressor, Communicator())
        sync_s = _time(lambda s=sync: s.sync("g", g), device, repeats)
        rows.append(
            {"compressor": name, "codec_s": codec_s, "codec_passes": codec_s / pass_s,
             "sync_s": sync_s, "sync_passes": sync_s / pass_s}
        )
    if device.type == "cuda" and triton_usable(device):
        zero = torch.zeros((), device=device)

        def a2sgd_ops() -> torch.Tensor:
            positive, means = partition_means_torch(g, zero)
            return expand_means(positive, means)

        codec_s = _time(a2sgd_ops, device, repeats)
        rows.append({"compressor": "a2sgd-ops", "codec_s": codec_s, "codec_passes": codec_s / pass_s})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the table for each size; ratios are against the pass measured in the same run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", type=float, default=[20e6, 100e6])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_compression {datetime.date.today()} torch {torch.__version__} on {device} ({where}), "
          f"{torch.get_num_threads()} threads, topk ratio {CONFIG['ratio']}, qsgd s={CONFIG['levels']}")
    for size in args.sizes:
        n = int(size)
        print(f"\nn = {n:,} fp32 elements")
        print(f"{'compressor':<10} {'codec ms':>10} {'passes':>8} {'sync ms':>10} {'passes':>8}")
        for row in bench(n, device, args.repeats):
            sync = f"{1e3 * row['sync_s']:>10.2f} {row['sync_passes']:>8.2f}" if "sync_s" in row else ""
            print(f"{row['compressor']:<10} {1e3 * row['codec_s']:>10.2f} {row['codec_passes']:>8.2f} {sync}")


if __name__ == "__main__":
    main()
