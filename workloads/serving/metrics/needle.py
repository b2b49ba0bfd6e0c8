"""Needle-retrieval accuracy, scored on the served outputs of the trial's own requests.

Only the output tokens each system returned are read (decoded with the model's tokenizer), so
our engine under every cache policy and vLLM are scored by the same rule
(``workloads.serving.load.needle.needle_correct``); a request that failed counts as wrong.
"""

from __future__ import annotations

from typing import Any

from workloads.serving.load.needle import needle_correct
from workloads.serving.transports.base import RequestRecord, RequestSpec


def needle_results(requests: list[RequestSpec], records: list[RequestRecord], tokenizer: Any | None) -> list[bool | None]:
    """Per request: whether its output states the needle's value (None for requests without a needle)."""
    results: list[bool | None] = []
    for spec, record in zip(requests, records, strict=True):
        if spec.answer is None:
            results.append(None)
        elif record.error is not None or tokenizer is None:
            results.append(False)
        else:
            results.append(needle_correct(tokenizer.decode(record.output_token_ids), spec.answer))
    return results


def needle_accuracy(results: list[bool | None]) -> float | None:
    """Fraction of needle requests answered correctly; None when the load had no needles."""
    scored = [r for r in results if r is not None]
    return sum(scored) / len(scored) if scored else None
