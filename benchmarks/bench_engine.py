"""Our engine (`full` policy) against transformers' ``generate()`` on the same model, measured in
one run, in two workloads of batch 16:

* ``fixed``: 16 requests, every prompt and every output the same length. Both systems run one
  batch; decode tokens/s = tokens generated after the first / (total time - prefill time).
* ``mixed``: 4 x 16 requests, same prompt length, output lengths drawn uniformly (seeded, the
  same for both). transformers runs static batches of 16 that each decode until their longest
  member is done (``generate()`` has no per-request length); our engine keeps 16 running and
  refills a slot as soon as a request finishes (continuous batching). Useful output tokens/s.

    .venv/bin/python -m benchmarks.bench_engine [--model smollm2-135m] [--weights real]
        [--prompt-len 64] [--output-len 64] [--min-output 8] [--max-output 128] [--threads N]

On a GPU (``--device cuda``; see benchmarks/bench_engine_gpu.py): decode tok/s and MBU of
full / h2o / streaming against transformers' static cache on dummy bf16 weights:

    python -m benchmarks.bench_engine --device cuda [--models llama-3-8b,opt-6.7b]
        [--batch-sizes 1,16,64] [--prompt-len 512] [--output-len 256] [--policies full,h2o,streaming,infinigen,offload]
        [--budget 0.2] [--repeats 3] [--profile DIR] [--profile-policies full,h2o] [--json FILE] [--eager]
        [--scheduling async,sync] [--no-transformers]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from backends.kvcache import EngineConfig, LLMEngine

BATCH = 16


def hf_model(engine: LLMEngine, args):
    """The same weights in transformers (a HF folder for real weights, the preset config for dummy)."""
    from transformers import AutoModelForCausalLM

    if engine.config.weights == "real":
        return AutoModelForCausalLM.from_pretrained(str(engine.weights_dir), dtype=torch.float32).eval()
    raise SystemExit("--weights dummy is not supported for the transformers baseline; use a real-weight model")


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one static batch of equal-length prompts to generate ``new_tokens`` each."""
    from transformers import GenerationConfig

    ids = torch.tensor(prompts)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def engine_run(engine: LLMEngine, prompts: list[list[int]], lengths: list[int]) -> tuple[float, float, int]:
    """(total seconds, seconds of prefill-only steps, tokens produced) for all requests at once."""
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(f"b{i}", p, n)
    prefill_s, produced = 0.0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        ts = time.perf_counter()
        is_prefill = not engine.scheduler.running  # a step with nothing decoding only prefills
        out = engine.step()
        if is_prefill:
            prefill_s += time.perf_counter() - ts
        produced += sum(len(o.new_token_ids) for o in out)
    return time.perf_counter() - t0, prefill_s, produced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="real")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 64 (cpu), 512 (cuda)")
    ap.add_argument("--output-len", type=int, default=None, help="default 64 (cpu), 256 (cuda)")
    ap.add_argument("--min-output", type=int, default=8)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    gpu = ap.add_argument_group("--device cuda")
    gpu.add_argument("--models", default="llama-3-8b,opt-6.7b")
    gpu.add_argument("--batch-sizes", default="1,16,64")
    gpu.add_argument("--policies", default="full,h2o,streaming")
    gpu.add_argument("--budget", type=float, default=0.2)
    gpu.add_argument("--repeats", type=int, default=3)
    gpu.add_argument("--profile", default=None, help="folder for torch profiler tables (10 decode steps)")
    gpu.add_argument("--profile-policies", default="full", help="policies profiled at every batch size")
    gpu.add_argument("--json", default=None, help="write every row as JSON here")
    gpu.add_argument("--eager", action="store_true", help="no CUDA graphs")
    gpu.add_argument("--scheduling", default="async",
                     help="async,sync: rows per engine scheduling (sync reads each step's tokens before the next launches)")
    gpu.add_argument("--no-transformers", action="store_true")
    gpu.add_argument("--no-gc-freeze", action="store_true", help="leave the cycle collector on during measured runs")
    gpu.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows (run only where vLLM is installed)")
    args = ap.parse_args()
    if args.device == "cuda":
        from benchmarks.bench_engine_gpu import run_gpu

        args.prompt_len, args.output_len = args.prompt_len or 512, args.output_len or 256
        run_gpu(args)
        return
    args.prompt_len, args.output_len = args.prompt_len or 64, args.output_len or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    engine = LLMEngine(EngineConfig(model=args.model, weights=args.weights, max_num_seqs=BATCH,
                                    max_model_len=args.prompt_len + max(args.output_len, args.max_output) + 1))
    model = hf_model(engine, args)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(BATCH * args.batches)]

    # warm-up both
    hf_generate(model, prompts[:2], 2)
    engine.generate(prompts[:2], 2)

    print(f"# bench_engine: {args.model} ({args.weights}), fp32, batch {BATCH}, prompt {args.prompt_len}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    # fixed lengths: decode tokens/s
    batch = prompts[:BATCH]
    hf_prefill = hf_generate(model, batch, 1)
    hf_total = hf_generate(model, batch, args.output_len)
    hf_decode_tps = BATCH * (args.output_len - 1) / (hf_total - hf_prefill)
    total, prefill, produced = engine_run(engine, batch, [args.output_len] * BATCH)
    ours_decode_tps = (produced - BATCH) / (total - prefill)
    print(f"fixed  output {args.output_len}: decode tok/s  transformers {hf_decode_tps:8.1f}  "
          f"engine {ours_decode_tps:8.1f}  ratio {ours_decode_tps / hf_decode_tps:.2f}x")

    # mixed output lengths: static batches vs continuous batching
    lengths = [rng.randint(args.min_output, args.max_output) for _ in prompts]
    t_hf = 0.0
    for i in range(0, len(prompts), BATCH):
        t_hf += hf_generate(model, prompts[i : i + BATCH], max(lengths[i : i + BATCH]))
    useful = sum(lengths)
    total, _, produced = engine_run(engine, prompts, lengths)
    assert produced == useful
    print(f"mixed  output {args.min_output}-{args.max_output}, {len(prompts)} requests: useful output tok/s  "
          f"transformers {useful / t_hf:8.1f}  engine {useful / total:8.1f}  ratio {(useful / total) / (useful / t_hf):.2f}x")


if __name__ == "__main__":
    main()
