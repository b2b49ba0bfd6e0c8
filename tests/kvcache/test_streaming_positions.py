"""StreamingLLM's positions: with re-rotation, a cached sink + window attends as a fresh sequence
of exactly those tokens would (positions 0..n-1); with ``rerotate: false`` it does not.

A one-layer Llama makes the check exact end to end: its keys and values depend on nothing but
their own token and position, so the streaming engine's log-prob of the next token must equal
a full-cache engine's on the fresh sequence sinks + window + new token."""

from __future__ import annotations

import json

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine
from backends.kvcache.presets import PRESETS

SINKS, WINDOW = 3, 6
TEXT, PROMPT = 40, 16


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A one-layer tiny Llama folder (dummy weights)."""
    folder = tmp_path_factory.mktemp("one-layer")
    (folder / "config.json").write_text(json.dumps({**PRESETS["tiny-llama"], "num_hidden_layers": 1}))
    return str(folder)


def _engine(model: str, policy: str, **params) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model, policy=policy, policy_params=params, block_size=4))
    with torch.no_grad():  # larger q/k weights: peaked attention, so positions matter to the output
        engine.model.layers[0].self_attn.qkv_proj.weight.mul_(10)
    return engine


def _fresh_logprobs(model: str, ids: list[int], prompt: int) -> list[float]:
    """Per scored position j, log p(ids[j]) with only the sinks and the window before it, from scratch."""
    full = _engine(model, "full")
    out = []
    for j in range(prompt + 1, TEXT):
        # the decode step that predicts ids[j] feeds ids[j-1] and holds the sinks plus the
        # WINDOW tokens before it (everything, while that is all there is)
        kept = ids[:j] if j - 1 - WINDOW <= SINKS else ids[:SINKS] + ids[j - 1 - WINDOW : j]
        out.append(full.score([*kept, ids[j]], len(kept))[0])
    return out


@pytest.mark.parametrize("rerotate", [True, False])
@pytest.mark.parametrize("prompt", [PROMPT, 2])  # cut at the prefill; sinks written while decoding
def test_cached_window_attends_as_a_fresh_sequence(one_layer, rerotate, prompt):
    ids = torch.randint(3, 500, (TEXT,), generator=torch.Generator().manual_seed(1)).tolist()
    fresh = torch.tensor(_fresh_logprobs(one_layer, ids, prompt))
    streaming = _engine(one_layer, "streaming", sink_tokens=SINKS, window=WINDOW, rerotate=rerotate)
    cached = torch.tensor(streaming.score(ids, prompt)[1:])  # (the first comes from the prefill)
    gap = (cached - fresh).abs().max().item()
    if rerotate:
        assert gap < 1e-4, f"re-rotated cache vs fresh sequence: max |log-prob difference| {gap}"
    else:  # the original positions put the sinks `gap` tokens further away: visibly different
        assert gap > 1e-2, f"without re-rotation the outputs should differ, max difference {gap}"


def test_rerotate_is_a_typed_knob():
    with pytest.raises(ValueError, match="rerotate: Input should be a valid boolean"):
        LLMEngine(EngineConfig(model="tiny-llama", policy="streaming", policy_params={"rerotate": "sometimes"}))
