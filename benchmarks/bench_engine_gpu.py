"""The GPU half of ``bench_engine`` (``--device cuda``): decode tokens/s and memory-bandwidth
utilisation (MBU) of our engine against transformers' static cache, measured in one run.

Per model shape (dummy bf16 weights), batch size and policy: ``batch`` requests of
``prompt_len`` tokens each generate ``output_len`` tokens; decode tok/s counts the tokens of
pure-decode steps (every request admitted, nothing prefilling) over those steps' time.
MBU = (weight bytes + K/V bytes the step reads) / step time / the device-to-device copy
bandwidth measured at the start of the same run (bytes read + written). Each configuration
runs ``repeats`` times; the median is reported with the spread (max - min) / median.
Memory and transfers, per row: ``peak_kv_mb`` is the store's own allocation peak (K/V pools,
side fields, a policy's device buffers and fetched K/V) over the measured runs; ``alloc_peak_gb``
the CUDA allocator's peak over the same runs (weights and activations included); ``h2d_gb_s``
the host-to-device bytes the policy's copies moved during decode over the decode time, and
``h2d_share`` that rate over the pinned host-to-device copy bandwidth measured at the start
(one large copy, median of 10).
Imports only ``backends.kvcache`` (and transformers), so it runs on a bare GPU host.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backends.kvcache import EngineConfig, LLMEngine
from backends.kvcache.presets import PRESETS


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20 copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times[3:])


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Pinned host -> device copy bandwidth in bytes/s, median of 10 copies."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[2:])


def freeze_gc(args) -> None:
    """Move every object alive now out of the cycle collector's reach for the measured runs (as
    vLLM does after start-up): a full collection over a large heap otherwise lands in some step
    and takes tens of milliseconds. ``gc.unfreeze()`` after the runs lets the engine be collected."""
    gc.collect()
    if not args.no_gc_freeze:
        gc.freeze()


@dataclass
class Row:
    model: str
    system: str
    batch: int
    decode_tok_s: float
    spread: float
    step_ms: float
    mbu: float
    runs: list[float]
    peak_kv_mb: float = 0.0
    alloc_peak_gb: float = 0.0
    h2d_gb_s: float = 0.0
    h2d_share: float = 0.0


def engine_decode(engine: LLMEngine, prompts: list[list[int]], new_tokens: int,
                  step_times: list[float] | None = None) -> tuple[float, int, float, int, int]:
    """(seconds, tokens, K/V bytes read, steps, host-to-device bytes) over the decode steps of
    one batch: from the step that delivers the last prompt's first token to the last delivery
    (under asynchronous scheduling tokens arrive one call after their step is launched, so
    the clock runs between deliveries, not around calls); each such call's seconds are
    appended to ``step_times`` if given."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, new_tokens)
    seconds, tokens, kv_read, steps, h2d = 0.0, 0, 0, 0, 0
    per_token = engine.model_config.kv_bytes_per_token
    started: set[str] = set()
    mark = None  # when every prompt had its first token: decode-only from here
    while engine.has_unfinished():
        stored = engine.stored_tokens()
        before = engine.policy.store.transfers.h2d_host
        t0 = time.perf_counter()
        out = engine.step()
        now = time.perf_counter()
        delivered = sum(len(o.new_token_ids) for o in out)
        if mark is not None and delivered:
            if step_times is not None:
                step_times.append(now - t0)
            tokens += delivered
            kv_read += (stored + len(prompts)) * per_token
            steps += 1
            h2d += engine.policy.store.transfers.h2d_host - before
            seconds = now - mark
        started.update(o.request_id for o in out if o.new_token_ids)
        if mark is None and len(started) == len(prompts):
            mark = now
    return seconds, tokens, kv_read, steps, h2d


def bench_engine_config(model: str, policy: str, params: dict, batches: list[int], args, bw: float,
                        vocab: int, h2d_bw: float, scheduling: str = "async") -> list[Row]:
    """Every batch size for one engine (built once, graphs captured in a warm-up)."""
    max_len = args.prompt_len + args.output_len + 16
    blocks = max(batches) * -(-max_len // 16) + 16
    engine = LLMEngine(EngineConfig(model=model, weights="dummy", dtype="bfloat16", device="cuda", policy=policy,
                                    policy_params=params, max_num_seqs=max(batches), max_model_len=max_len,
                                    kv_cache_blocks=blocks, max_num_batched_tokens=16384,
                                    cuda_graphs=not args.eager, async_scheduling=scheduling == "async"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    label = policy if not params else f"{policy} {params.get('kv_budget')}"
    if getattr(engine.policy, "uva", False):
        label += " (in-place host reads)"
    if scheduling == "sync":
        label += " sync"
    for b in batches:
        prompts = torch.randint(100, vocab, (b, args.prompt_len), generator=gen).tolist()
        # warm-up at full length: compiles kernels, captures this bucket's graph and grows an
        # evicting policy's store to its steady size (a growth re-captures the graphs: ~40 ms
        # once, which inside a measured run was most of its spread)
        engine_decode(engine, prompts, args.output_len)
        torch.cuda.synchronize()
        engine.reset_peaks()
        transfers = engine.policy.store.transfers
        runs, step_ms, mbus, h2d_rates, times = [], [], [], [], []
        freeze_gc(args)
        collections = [g["collections"] for g in gc.get_stats()]
        for _ in range(args.repeats):
            dev_before = transfers.h2d - transfers.h2d_host  # rows the GPU selected (counted there)
            s, n, kv, steps, h2d = engine_decode(engine, prompts, args.output_len, times)
            h2d += transfers.h2d - transfers.h2d_host - dev_before
            runs.append(n / s)
            step_ms.append(1e3 * s / steps)
            mbus.append((engine.weight_bytes * steps + kv) / s / bw)
            h2d_rates.append(h2d / s)
        gc.unfreeze()
        med = statistics.median(runs)
        rate = statistics.median(h2d_rates)
        rows.append(Row(model, f"engine {label}", b, med, (max(runs) - min(runs)) / med,
                        statistics.median(step_ms), statistics.median(mbus), runs,
                        peak_kv_mb=engine.peak_kv_bytes() / 2**20,
                        alloc_peak_gb=engine.peak_device_bytes() / 2**30, h2d_gb_s=rate / 1e9,
                        h2d_share=rate / h2d_bw))
        r = rows[-1]
        print(f"  {model:10s} {r.system:22s} batch {b:3d}: {med:9.1f} tok/s  step {r.step_ms:6.2f} ms  "
              f"MBU {r.mbu:5.1%}  spread {r.spread:4.1%}  peak KV {r.peak_kv_mb:8.1f} MiB  "
              f"alloc peak {r.alloc_peak_gb:6.2f} GiB  H2D {r.h2d_gb_s:6.1f} GB/s ({r.h2d_share:4.0%})", flush=True)
        # the mean step against the median step: slow outliers (a collection, a recapture) show here
        gcs = [g["collections"] - c for g, c in zip(gc.get_stats(), collections, strict=True)]
        slow = sorted(range(len(times)), key=times.__getitem__)[-3:][::-1]
        print(f"    steps: median {1e3 * statistics.median(times):.3f} ms, mean {1e3 * statistics.mean(times):.3f} ms, "
              f"slowest {', '.join(f'#{i} {1e3 * times[i]:.1f} ms' for i in slow)}; "
              f"gc collections per generation {gcs}", flush=True)
        if args.profile and policy in args.profile_policies.split(","):
            profile(engine, model, vocab, args, label, b)
    del engine
    gc.collect()  # the runner's graphs and closures form cycles: free the engine's memory now
    torch.cuda.empty_cache()
    return rows


def profile(engine: LLMEngine, model: str, vocab: int, args, label: str, batch: int) -> None:
    """A torch profiler table over 10 pure-decode steps, appended to one file per model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(100, vocab, (batch, args.prompt_len), generator=gen).tolist()
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, 100)
    for _ in range(20):
        engine.step()
    split = step_split(engine, batch)  # before the profiler: launches stay slower after it
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10
    while engine.has_unfinished():
        engine.step()
    out = Path(args.profile) / f"profile_{model}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(f"\n## {label} batch {batch}: 10 decode steps, {1e3 * wall:.2f} ms per step (wall, profiled)\n")
        f.write(split)
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    print(f"  profile of {label} batch {batch} appended to {out}")


def step_split(engine: LLMEngine, batch: int, steps: int = 20) -> str:
    """Where a pure-decode step's time goes: wall time per step, the captured graph's GPU time
    replayed alone, the rest (host work the GPU waits for), and the host functions costing most
    (cProfile, own time). Call with ``batch`` requests decoding; leaves them decoding."""
    import cProfile
    import io
    import pstats

    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    lines = [f"step wall {1e3 * wall:.3f} ms (median of {steps})"]
    graphs = engine.runner.graphs
    captured = graphs.captured.get(graphs.bucket(batch)) if graphs is not None else None
    if captured is not None:  # replaying changes the cache's contents, not its shape (timing only)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(steps):
            captured.graph.replay()
        b.record()
        b.synchronize()
        gpu = a.elapsed_time(b) / 1e3 / steps
        lines.append(f"graph GPU {1e3 * gpu:.3f} ms, host between replays {1e3 * (wall - gpu):.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    body = text.getvalue()
    lines.append(body[body.find("   ncalls"):] if "   ncalls" in body else body)
    return "\n".join(lines) + "\n"


def timed_decode_row(model: str, system: str, batch: int, decode_s, repeats: int, args,
                     weight_bytes: int, kv_tok: int, bw: float) -> Row:
    """One row for a system timed from outside (transformers, vLLM): ``decode_s()`` returns the
    seconds of ``output_len - 1`` decode steps (a full run minus a one-token run); MBU counts the
    weights once per step plus the KV read over the growing context."""
    runs, steps_ms, mbus = [], [], []
    steps = args.output_len - 1
    kv = sum(batch * (args.prompt_len + i) for i in range(1, args.output_len)) * kv_tok
    freeze_gc(args)
    for _ in range(repeats):
        dec = decode_s()
        runs.append(batch * steps / dec)
        steps_ms.append(1e3 * dec / steps)
        mbus.append((weight_bytes * steps + kv) / dec / bw)
    gc.unfreeze()
    med = statistics.median(runs)
    row = Row(model, system, batch, med, (max(runs) - min(runs)) / med,
              statistics.median(steps_ms), statistics.median(mbus), runs)
    print(f"  {model:10s} {system:22s} batch {batch:3d}: {med:9.1f} tok/s  "
          f"step {row.step_ms:6.2f} ms  MBU {row.mbu:5.1%}  spread {row.spread:4.1%}", flush=True)
    return row


def hf_static(model: str, batches: list[int], args, bw: float) -> list[Row]:
    """transformers' generate() with its static cache (eager: no torch.compile), same shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf_cfg = AutoConfig.for_model(**PRESETS[model])
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    vocab = hf_cfg.vocab_size
    cfg = PRESETS[model]
    kv_tok = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    gen = torch.Generator().manual_seed(0)
    rows = []

    def run(ids, n):
        g = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             cache_implementation="static", disable_compile=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), generation_config=g)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    for b in batches:
        ids = torch.randint(100, vocab, (b, args.prompt_len), generator=gen).cuda()
        run(ids, 2)
        pre = min(run(ids, 1) for _ in range(3))
        # transformers is slow: two runs give its spread
        rows.append(timed_decode_row(model, "transformers static", b, lambda ids=ids, pre=pre: run(ids, args.output_len) - pre,
                                     min(args.repeats, 2), args, weight_bytes, kv_tok, bw))
    return rows


def vllm_static(model: str, batches: list[int], args, bw: float) -> list[Row]:
    """vLLM's offline engine (its defaults: CUDA graphs, paged attention), same shape with random
    weights, same lengths; decode time = a run of ``output_len`` tokens minus a run of one token.
    Returns no row where vLLM is not installed (the GPU hosts this project runs on lack it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print(f"  {model:10s} vLLM is not installed here: no vLLM row", flush=True)
        return []
    from transformers import AutoConfig, AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from backends.kvcache.vllm.model_folder import dummy_folder, kv_bytes_per_token

    folder = dummy_folder(dict(PRESETS[model]), "bfloat16")
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.for_model(**PRESETS[model]), dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in shape.parameters())
    kv_tok = kv_bytes_per_token(folder.hf_config, "bfloat16")
    llm = LLM(model=str(folder.path), load_format=folder.load_format, dtype="bfloat16", seed=0,
              max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=max(batches),
              gpu_memory_utilization=0.6)
    vocab = PRESETS[model]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    rows = []

    def run(prompts, n: int, engine=llm) -> float:
        sp = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
        t0 = time.perf_counter()
        outs = engine.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return time.perf_counter() - t0

    for b in batches:
        prompts = torch.randint(100, vocab, (b, args.prompt_len), generator=gen).tolist()
        run(prompts, 4)
        pre = min(run(prompts, 1) for _ in range(3))
        rows.append(timed_decode_row(model, "vLLM", b, lambda run=run, prompts=prompts, pre=pre: run(prompts, args.output_len) - pre,
                                     args.repeats, args, weight_bytes, kv_tok, bw))
    del run, llm  # vLLM's engine holds most of the device's memory until collected
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def run_gpu(args) -> None:
    """The whole GPU benchmark; prints a table and writes JSON when asked."""
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    h2d_bw = h2d_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    print(f"# bench_engine --device cuda: {name}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"pinned host-to-device {h2d_bw / 1e9:.1f} GB/s, "
          f"prompt {args.prompt_len}, new tokens {args.output_len}, repeats {args.repeats}, "
          f"{'eager' if args.eager else 'CUDA graphs'}", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[Row] = []
    for model in args.models.split(","):
        vocab = PRESETS[model]["vocab_size"]
        for policy in args.policies.split(","):
            params = {"kv_budget": args.budget} if policy in ("h2o", "streaming", "infinigen") else {}
            for scheduling in args.scheduling.split(","):
                rows += bench_engine_config(model, policy, params, batches, args, bw, vocab, h2d_bw, scheduling)
        if not args.no_vllm:
            rows += vllm_static(model, batches, args, bw)
        if not args.no_transformers:
            rows += hf_static(model, batches, args, bw)
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| model | system | batch | decode tok/s | step ms | MBU | spread | vs transformers static | "
          "vs `full` | peak KV MiB | allocator peak GiB | H2D GB/s (share of pinned copy) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {(r.model, r.batch): r.decode_tok_s for r in rows if r.system == "transformers static"}
    # against `full` with the same scheduling, same model and batch
    full = {(r.model, r.batch, r.system.endswith(" sync")): r.decode_tok_s for r in rows
            if r.system in ("engine full", "engine full sync")}
    for r in rows:
        ratio = f"{r.decode_tok_s / base[(r.model, r.batch)]:.2f}x" if (r.model, r.batch) in base else "-"
        key = (r.model, r.batch, r.system.endswith(" sync"))
        vs_full = f"{r.decode_tok_s / full[key]:.2f}x" if r.system.startswith("engine") and key in full else "-"
        h2d = f"{r.h2d_gb_s:.1f} ({r.h2d_share:.0%})" if r.h2d_gb_s else "-"
        mem = f"{r.peak_kv_mb:.0f} | {r.alloc_peak_gb:.2f}" if r.peak_kv_mb else "- | -"
        print(f"| {r.model} | {r.system} | {r.batch} | {r.decode_tok_s:.1f} | {r.step_ms:.2f} | {r.mbu:.1%} | "
              f"{r.spread:.1%} | {ratio} | {vs_full} | {mem} | {h2d} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"gpu": name, "copy_bandwidth": bw, "h2d_bandwidth": h2d_bw,
                                               "torch": torch.__version__,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
