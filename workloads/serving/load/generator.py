"""The load generator: load parameters -> an open-loop schedule of requests.

Deterministic by ``load.seed``: arrivals, input lengths, output lengths and prompt tokens each
draw from their own child stream of the seed, so changing one (say the output distribution)
leaves the others unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workloads.serving.load.arrivals import arrival_times
from workloads.serving.load.corpus import text_passages
from workloads.serving.load.lengths import sample_lengths
from workloads.serving.load.needle import NeedlePrompt, needle_prompt
from workloads.serving.load.trace import TraceEntry, read_trace
from workloads.serving.params import LoadParams
from workloads.serving.transports.base import RequestSpec

DEFAULT_NUM_REQUESTS = 100


def _synthetic_prompts(
    lengths: list[int], vocab_size: int, tokenizer: Any | None, rng: np.random.Generator
) -> list[list[int]]:
    """Uniform random token ids, avoiding the tokenizer's special tokens when there is one."""
    specials = sorted(set(getattr(tokenizer, "all_special_ids", None) or []))
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(specials, dtype=np.int64))
    return [[int(t) for t in allowed[rng.integers(0, len(allowed), size=n)]] for n in lengths]


def _prompts(
    load: LoadParams, lengths: list[int], vocab_size: int, tokenizer: Any | None, rng: np.random.Generator
) -> list[list[int]]:
    if load.prompt_source == "corpus":
        if tokenizer is None:
            raise ValueError("load.prompt_source 'corpus' needs a tokenizer: use weights 'real' (e.g. smollm2-135m)")
        return text_passages(tokenizer, lengths, rng)
    return _synthetic_prompts(lengths, vocab_size, tokenizer, rng)


def _needle_prompts(
    load: LoadParams, lengths: list[int], tokenizer: Any | None, rng: np.random.Generator
) -> list[NeedlePrompt]:
    if tokenizer is None:
        raise ValueError("load.prompt_source 'needle' needs a tokenizer: use weights 'real' (e.g. smollm2-135m)")
    n = load.needle
    return [
        needle_prompt(tokenizer, length, n.depths[i % len(n.depths)], n.num_keys, n.value_digits, n.chat, rng)
        for i, length in enumerate(lengths)
    ]


def _decode(tokenizer: Any | None, ids: list[int]) -> str | None:
    return tokenizer.decode(ids) if tokenizer is not None else None


def build_load(load: LoadParams, vocab_size: int, tokenizer: Any | None = None) -> list[RequestSpec]:
    """The requests of one load, in arrival order, with prompts and forced output lengths."""
    arrival_rng, input_rng, output_rng, prompt_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(load.seed).spawn(4)
    )
    trace: list[TraceEntry] | None = None
    if load.arrival == "trace":
        trace = read_trace(load.trace)[: load.num_requests]
        arrivals = [e.arrival_s for e in trace]
        input_lens = [e.input_len for e in trace]
        output_lens = [e.output_len for e in trace]
    else:
        n = load.num_requests or DEFAULT_NUM_REQUESTS
        arrivals = arrival_times(load.arrival, n, load.request_rate, load.burstiness, arrival_rng).tolist()
        input_lens = sample_lengths(load.input_dist, n, load.input_len, load.input_spread, input_rng)
        output_lens = sample_lengths(load.output_dist, n, load.output_len, load.output_spread, output_rng)

    answers: list[str | None] = [None] * len(input_lens)
    if load.prompt_source == "needle":
        needles = _needle_prompts(load, input_lens, tokenizer, prompt_rng)
        prompts = [p.token_ids for p in needles]
        answers = [p.value for p in needles]
    else:
        prompts = _prompts(load, input_lens, vocab_size, tokenizer, prompt_rng)
    texts: list[str | None] = [None] * len(prompts)
    if trace is not None:
        # A trace line's own prompt wins over the generated one.
        for i, entry in enumerate(trace):
            if entry.prompt_token_ids is not None:
                prompts[i] = entry.prompt_token_ids
            elif entry.prompt is not None:
                if tokenizer is None:
                    raise ValueError("a trace with text prompts needs a tokenizer: use weights 'real'")
                prompts[i] = tokenizer.encode(entry.prompt, add_special_tokens=False)
                texts[i] = entry.prompt
    if load.prompt_source in ("corpus", "needle"):
        texts = [t if t is not None else _decode(tokenizer, p) for t, p in zip(texts, prompts, strict=True)]

    return [
        RequestSpec(
            request_id=f"req-{i:05d}",
            arrival_s=float(arrivals[i]),
            prompt_token_ids=prompts[i],
            max_tokens=int(output_lens[i]),
            prompt_text=texts[i],
            ignore_eos=load.ignore_eos,
            answer=answers[i],
        )
        for i in range(len(prompts))
    ]
