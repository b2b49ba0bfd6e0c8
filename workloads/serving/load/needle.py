"""Needle-in-a-haystack prompts (RULER's ``niah`` style), generated offline from the KJV corpus.

A prompt is a haystack of consecutive KJV verses cut to the request's input length, with
``num_keys`` sentences "One of the special magic numbers for <key> is: <value>." inserted at
verse boundaries; the question asks for the first key's value. The asked needle sits at the
request's depth (``needle.depths[i % len(depths)]``: 0 = start of the haystack, 1 = end); the
others (distractors, RULER's multi-key variant) at seeded random depths. Keys are words, values
random ``value_digits``-digit numbers, everything drawn from the load's prompt seed, so the same
grid gives the same prompts on every backend. With ``chat`` the prompt is wrapped in the model's
chat template and the assistant turn starts with the answer's lead-in, which small instruct
models need to answer at all (see docs/serving.md).

Scoring is on the served output only (so vLLM and every cache policy are scored alike): a
request is correct when the first run of digits in its decoded output equals the value.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from workloads.serving.load.corpus import verses

# Common, single-meaning English nouns that are rare in the KJV: a key never collides with the text.
KEY_WORDS = (
    "anchor", "balloon", "bicycle", "blanket", "button", "camera", "candle", "carpet", "castle", "cherry",
    "compass", "cookie", "cotton", "crystal", "diamond", "dolphin", "engine", "falcon", "feather", "forest",
    "garden", "giraffe", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder",
    "lantern", "lemon", "magnet", "marble", "meadow", "mirror", "monkey", "needle", "orange", "panda",
    "parrot", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "puzzle", "rabbit", "ribbon",
    "rocket", "saddle", "shadow", "spider", "statue", "sugar", "tablet", "teapot", "ticket", "tiger",
    "tomato", "tunnel", "turtle", "umbrella", "valley", "violin", "wagon", "walnut", "window", "zebra",
)
INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n"
)
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER = "The special magic number for {key} mentioned in the provided text is"
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle request: its prompt ids and what a correct answer contains."""

    token_ids: list[int]
    key: str
    value: str
    depth: float  # where the asked needle sits in the haystack (fraction of its tokens)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _frame(tokenizer: Any, key: str, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack (instructions, question, answer lead-in)."""
    question = QUESTION.format(key=key)
    answer = ANSWER.format(key=key)
    if not chat:
        return _encode(tokenizer, INTRO), _encode(tokenizer, question + "\n" + answer)
    marker = "\x00HAYSTACK\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": INTRO + marker + question}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(marker)
    return _encode(tokenizer, before), _encode(tokenizer, after + answer)


def _haystack(tokenizer: Any, length: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """``length`` tokens of consecutive verses from a seeded start, and the verse boundaries in it."""
    all_verses = verses()
    i = int(rng.integers(0, len(all_verses)))
    ids: list[int] = []
    boundaries = [0]
    while len(ids) < length:
        ids.extend(_encode(tokenizer, " " + all_verses[i % len(all_verses)]))
        boundaries.append(len(ids))
        i += 1
    return ids[:length], [b for b in boundaries if b <= length]


def needle_prompt(
    tokenizer: Any, length: int, depth: float, num_keys: int, value_digits: int, chat: bool, rng: np.random.Generator
) -> NeedlePrompt:
    """A prompt of exactly ``length`` tokens hiding ``num_keys`` needles; the first is asked at ``depth``."""
    keys = [KEY_WORDS[k] for k in rng.choice(len(KEY_WORDS), size=num_keys, replace=False)]
    values = [str(int(rng.integers(10 ** (value_digits - 1), 10**value_digits))) for _ in keys]
    needles = [_encode(tokenizer, NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)]
    before, after = _frame(tokenizer, keys[0], chat)
    room = length - len(before) - len(after) - sum(len(n) for n in needles)
    if room < 16:
        need = length - room + 16
        raise ValueError(f"load.input_len {length} is too short for a needle prompt; use at least {need} tokens")
    hay, boundaries = _haystack(tokenizer, room, rng)
    depths = [depth, *rng.uniform(0.0, 1.0, size=num_keys - 1).tolist()]
    # Each needle goes to the verse boundary nearest its depth; insert from the back so offsets hold.
    spots = []
    for needle_depth in depths:
        at = bisect.bisect_left(boundaries, needle_depth * room)
        candidates = [b for b in (boundaries[max(at - 1, 0)], boundaries[min(at, len(boundaries) - 1)])]
        spots.append(min(candidates, key=lambda b: abs(b - needle_depth * room)))
    body = list(hay)
    for spot, needle in sorted(zip(spots, needles, strict=True), key=lambda p: -p[0]):
        body[spot:spot] = needle
    ids = before + body + after
    return NeedlePrompt(token_ids=ids, key=keys[0], value=values[0], depth=spots[0] / room)


def needle_correct(output_text: str, value: str) -> bool:
    """Exact match: the first run of digits in the output is the needle's value."""
    found = _DIGITS.search(output_text)
    return found is not None and found.group() == value
