"""Output quality of a lossy cache policy against the full cache, on real text.

Both engines see the same passages of the shipped corpus (workloads/serving/load/corpus.py):
- perplexity: teacher-forced log-probs of each passage's continuation after its prompt,
  computed with ``engine.score`` (the policy applied exactly as in decoding);
  ``ppl = exp(total NLL / scored tokens)``, ``ppl_ratio = ppl(policy) / ppl(full)``;
- greedy-token agreement: ``engine.generate`` from each prompt for the continuation's length;
  the fraction of generated positions where the policy's token equals the full cache's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from workloads.serving.load.corpus import text_passages
from workloads.serving.params import QualityParams

# Quality passages come from their own seed, independent of the load's prompts.
QUALITY_SEED = 20260405


@dataclass(frozen=True)
class QualityRun:
    """What one engine did on the quality passages."""

    nll: float  # summed negative log-likelihood of the scored tokens
    scored_tokens: int
    generations: list[list[int]]

    @property
    def ppl(self) -> float:
        """Perplexity over all scored tokens."""
        return math.exp(self.nll / self.scored_tokens)


@dataclass(frozen=True)
class QualityResult:
    """A policy's quality relative to the full cache."""

    ppl: float
    ppl_ref: float
    ppl_ratio: float
    token_agreement: float


def quality_passages(tokenizer: Any, quality: QualityParams) -> list[list[int]]:
    """The token ids of the passages quality is measured on (deterministic)."""
    if tokenizer is None:
        raise ValueError("quality needs real text and a tokenizer: use weights 'real' (e.g. smollm2-135m)")
    rng = np.random.default_rng(QUALITY_SEED)
    return text_passages(tokenizer, [quality.text_len] * quality.num_texts, rng)


def run_quality(engine: Any, passages: list[list[int]], prompt_len: int) -> QualityRun:
    """Score and greedily continue every passage with ``engine``."""
    nll, scored = 0.0, 0
    for ids in passages:
        logprobs = engine.score(ids, prompt_len)
        nll -= float(sum(logprobs))
        scored += len(logprobs)
    continuation = len(passages[0]) - prompt_len
    generations = engine.generate([ids[:prompt_len] for ids in passages], max_tokens=continuation, ignore_eos=True)
    return QualityRun(nll, scored, [list(g) for g in generations])


def token_agreement(candidate: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of positions where the candidate's greedy token equals the reference's."""
    same = total = 0
    for cand, ref in zip(candidate, reference, strict=True):
        total += len(ref)
        same += sum(a == b for a, b in zip(cand, ref, strict=False))
    return same / total if total else math.nan


def compare(policy: QualityRun, reference: QualityRun) -> QualityResult:
    """Perplexity ratio and token agreement of a policy's run against the full cache's."""
    return QualityResult(
        ppl=policy.ppl,
        ppl_ref=reference.ppl,
        ppl_ratio=policy.ppl / reference.ppl,
        token_agreement=token_agreement(policy.generations, reference.generations),
    )
