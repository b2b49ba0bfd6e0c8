"""KV memory of lossy policies against the full cache, with the quality they cost.

Runs one workload (corpus prompts, all requests at once) through the serving kind three times:
``full``, ``h2o`` and ``streaming`` at the same KV budget on SmolLM2-135M real weights, and prints
each policy's peak device KV bytes as a ratio of full's (expected near the budget), next to its
perplexity ratio and greedy-token agreement against full. Two peaks: the engine's own (which
includes a prompt's full KV inside the prefill step, before eviction) and the largest KV
resident between steps.

    .venv/bin/python -m benchmarks.bench_kv_memory [--budget 0.2] [--requests 8] [--input-len 256]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from workloads.kind import TrialContext
from workloads.serving.kind import ServingKind, ServingParams

POLICIES = ("full", "h2o", "streaming")


def _params(policy: str, args: argparse.Namespace) -> ServingParams:
    return ServingParams.model_validate(
        {
            "model": "smollm2-135m",
            "weights": "real",
            "backend": policy,
            "policy": {"kv_budget": args.budget} if policy != "full" else {},
            "engine": {"max_num_seqs": args.requests, "max_model_len": args.input_len + args.output_len + 16},
            "load": {
                "arrival": "constant",
                "request_rate": float("inf"),
                "num_requests": args.requests,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "prompt_source": "corpus",
                "seed": 0,
            },
            "quality": {
                "enabled": True,
                "num_texts": args.quality_texts,
                "text_len": args.input_len + args.output_len,
                "prompt_len": args.input_len,
            },
        }
    )


def measure(policy: str, args: argparse.Namespace) -> dict:
    """One trial of the serving kind for ``policy``; its summary row."""
    kind = ServingKind()
    params = _params(policy, args)
    ctx = TrialContext("bench-kv-memory", policy, 0, 0, Path("/tmp"), {})
    out = kind.run_alone(params, ctx)
    (summary,) = out.tables["serving_summary"].to_pylist()
    return summary


def main(argv: list[str] | None = None) -> None:
    """Measure full, h2o and streaming; print peak KV ratios and quality side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--quality-texts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.time()
    results = {policy: measure(policy, args) for policy in POLICIES}
    full_kv = results["full"]["peak_kv_bytes"]
    full_steps = results["full"]["peak_kv_bytes_steps"]
    print(f"# bench_kv_memory: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, budget {args.budget}, {args.requests} requests x "
          f"({args.input_len} in + {args.output_len} out), SmolLM2-135M real weights, {time.time() - started:.0f} s")
    print("| policy | peak KV bytes (in-step) | vs full | peak KV between steps | vs full | ppl | ppl ratio "
          "| token agreement | output tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for policy, s in results.items():
        print(
            f"| {policy} | {s['peak_kv_bytes']:,} | {s['peak_kv_bytes'] / full_kv:.3f}x "
            f"| {s['peak_kv_bytes_steps']:,} | {s['peak_kv_bytes_steps'] / full_steps:.3f}x "
            f"| {s['ppl']:.3f} | {s['ppl_ratio']:.4f} | {s['token_agreement']:.3f} | {s['output_throughput']:.1f} |"
        )


if __name__ == "__main__":
    main()
