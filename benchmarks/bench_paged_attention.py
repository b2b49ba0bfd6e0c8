"""Paged decode attention alone, per layer, by split count: what a cache budget buys the kernel.

Times ``paged_decode_attention`` for ``full`` (every entry of the context) and for a budgeted
policy (``--budget`` of the entries, with h2o's fused column scores), 32 layer calls captured
in one CUDA graph and replayed (launch cost excluded, as in the engine), at each split count
of the sequence. Each cell is microseconds per layer call and its ratio to ``full`` at the
engine's own split count (``num_splits``), measured in the same run. CUDA only.

    python3 -m benchmarks.bench_paged_attention [--batch-sizes 1,16] [--contexts 768,4096] [--budget 0.2]
"""

from __future__ import annotations

import argparse
import datetime

import torch

from backends.kvcache.kernels import ops

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16  # Llama-3-8B's attention shape
LAYERS = 32
SPLITS = (1, 2, 4, 8, 16)


def per_layer_us(batch: int, entries: int, splits: int, score: bool) -> float:
    """Median microseconds per layer call of 32 graph-replayed calls (one per layer's cache)."""
    dev = torch.device("cuda")
    pages = -(-entries // PAGE) + 1
    slots = batch * pages * PAGE
    shape = (slots, KV_HEADS, HEAD_DIM)
    qs = [torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    ks = [torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    vs = [torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    scores = [torch.zeros(slots, KV_HEADS, device=dev) if score else None for _ in range(LAYERS)]
    table = torch.arange(batch * pages, device=dev, dtype=torch.int32).view(batch, pages)
    lens = torch.full((batch,), entries, device=dev, dtype=torch.int32)

    def step() -> None:
        for i in range(LAYERS):
            ops().paged_decode_attention(qs[i], ks[i], vs[i], table, lens, HEAD_DIM**-0.5, PAGE, splits=splits,
                                         score=scores[i])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs above are written on the default stream
    with torch.cuda.stream(side):  # compile and warm up off the capture
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 20 / LAYERS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--contexts", default="768,4096", help="entries of full's context")
    ap.add_argument("--budget", type=float, default=0.2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged_attention needs a CUDA device")
    from backends.kvcache.kernels.triton_kernels import num_splits

    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; "
          f"us per layer call (ratio to full at the engine's split count)")
    print("| batch | context | cache | entries | engine splits | " + " | ".join(f"{s} splits" for s in SPLITS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(SPLITS))
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        engine_splits = num_splits(batch, KV_HEADS, dev)
        for context in [int(c) for c in args.contexts.split(",")]:
            base = per_layer_us(batch, context, engine_splits, False)
            kept = max(1, int(args.budget * context))
            for cache, entries, score in (("full", context, False), (f"budget {args.budget} + scores", kept, True)):
                cells = [per_layer_us(batch, entries, s, score) for s in SPLITS]
                row = " | ".join(f"{t:.2f} ({t / base:.2f}x)" for t in cells)
                print(f"| {batch} | {context} | {cache} | {entries} | {engine_splits} | {row} |", flush=True)


if __name__ == "__main__":
    main()
