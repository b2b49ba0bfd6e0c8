"""Quality of the lossy cache policies against ``full`` on real weights and real text, and what
InfiniGen's speculation selects (CPU is enough; SmolLM2-135M ships offline).

For each budget: perplexity ratio and greedy-token agreement against ``full`` (the trial
quality metrics, workloads/serving/metrics/quality.py) for h2o, infinigen and streaming (with
and without re-rotation). For infinigen also: the mean fraction of the stored tokens its
speculated layers fetch, and the share of (step, layer, sequence) selections the budget cap
decided (alpha's count above the cap). Run with ``--budgets 1.0`` to measure alpha's own
selection fraction without a cap (InfiniGen's ``MEASURED_FETCH_FRACTION``, the dummy-weight default).

    .venv/bin/python -m benchmarks.kv_policy_quality [--budgets 0.25,0.5] [--num-texts 4]
        [--text-len 256] [--prompt-len 128] [--policies h2o,infinigen,infinigen:alpha=6,streaming,streaming-original]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from backends.kvcache import EngineConfig, LLMEngine
from workloads.serving.metrics.quality import compare, quality_passages, run_quality
from workloads.serving.params import QualityParams

VARIANTS = {  # name -> (policy, extra knobs)
    "h2o": ("h2o", {}),
    "infinigen": ("infinigen", {}),
    "streaming": ("streaming", {}),
    "streaming-original": ("streaming", {"rerotate": False}),
}


def record_selection(policy) -> list[tuple[int, int, bool]]:
    """(tokens fetched, tokens stored, capped) per speculated layer, decode step and sequence."""
    seen: list[tuple[int, int, bool]] = []
    inner = policy.after_attention

    def after_attention(layer, x, batch):
        inner(layer, x, batch)
        if layer + 1 in policy.selection:
            _, ok, _ = policy.selection[layer + 1]
            caps = policy.step_meta[1]
            fetched = ok[:, 0].sum(-1)  # the same count for every KV head
            for b in range(ok.shape[0]):
                n = int(batch.prev_len[b])
                seen.append((int(fetched[b]), n, int(fetched[b]) >= int(caps[b]) and int(caps[b]) < n))

    policy.after_attention = after_attention
    return seen


def knob_values(spec: str) -> dict[str, float | bool]:
    """``name:alpha=6:rerotate=false`` -> {"alpha": 6.0, "rerotate": False}."""
    out: dict[str, float | bool] = {}
    for item in spec.split(":")[1:]:
        key, _, value = item.partition("=")
        out[key] = value == "true" if value in ("true", "false") else float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.25,0.5")
    ap.add_argument("--num-texts", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--policies", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [p for p in args.policies.split(",") if p]
    unknown = sorted({n.split(":")[0] for n in names} - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; allowed: {sorted(VARIANTS)}, each with optional :knob=value")

    def engine(policy: str, **knobs) -> LLMEngine:
        return LLMEngine(EngineConfig(model=args.model, weights="real", policy=policy, policy_params=knobs))

    t0 = time.perf_counter()
    full = engine("full")
    quality = QualityParams(num_texts=args.num_texts, text_len=args.text_len, prompt_len=args.prompt_len)
    passages = quality_passages(full.tokenizer, quality)
    reference = run_quality(full, passages, args.prompt_len)
    print(f"model {args.model}, {args.num_texts} KJV passages of {args.text_len} tokens (prompt {args.prompt_len}); "
          f"full ppl {reference.ppl:.3f}")
    print("| policy | budget | ppl ratio | token agreement | infinigen fetched / stored | cap decided |")
    print("|---|---|---|---|---|---|")
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in names:
            policy, knobs = VARIANTS[name.split(":")[0]]
            eng = engine(policy, kv_budget=budget, **knobs, **knob_values(name))
            seen = record_selection(eng.policy) if policy == "infinigen" else None
            result = compare(run_quality(eng, passages, args.prompt_len), reference)
            extra = "| |"
            if seen:
                frac = sum(f for f, _, _ in seen) / sum(n for _, n, _ in seen)
                capped = sum(c for _, _, c in seen) / len(seen)
                extra = f"| {frac:.3f} | {capped:.1%} |"
            ratio = "nan" if math.isnan(result.ppl_ratio) else f"{result.ppl_ratio:.3f}"
            print(f"| {name} | {budget} | {ratio} | {result.token_agreement:.3f} {extra}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
