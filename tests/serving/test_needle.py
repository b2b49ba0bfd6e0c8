"""The needle-retrieval task: prompts (exact length, depth, determinism), scoring, validation, end to end."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from workloads.serving.kind import ServingKind, ServingParams
from workloads.serving.load import build_load
from workloads.serving.load.needle import NEEDLE, needle_correct, needle_prompt
from workloads.serving.metrics.needle import needle_accuracy, needle_results
from workloads.serving.params import LoadParams
from workloads.serving.transports.base import RequestRecord, RequestSpec


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from backends.kvcache.loader import gguf_to_hf_folder, packaged_file
    from backends.kvcache.presets import REAL_WEIGHTS

    return AutoTokenizer.from_pretrained(str(gguf_to_hf_folder(packaged_file(*REAL_WEIGHTS["smollm2-135m"]), "smollm2-135m")))


def _needle_at(tokenizer, ids: list[int], key: str, value: str) -> int:
    """Token index where the needle sentence starts in ``ids``."""
    needle = tokenizer.encode(NEEDLE.format(key=key, value=value), add_special_tokens=False)
    return next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(tokenizer, chat: bool) -> None:
    shallow = needle_prompt(tokenizer, 600, 0.1, 1, 7, chat, np.random.default_rng(1))
    deep = needle_prompt(tokenizer, 600, 0.9, 1, 7, chat, np.random.default_rng(1))
    for prompt in (shallow, deep):
        assert len(prompt.token_ids) == 600 and len(prompt.value) == 7 and prompt.value.isdigit()
        text = tokenizer.decode(prompt.token_ids)
        assert text.count(prompt.value) == 1 and text.rstrip().endswith(f"{prompt.key} mentioned in the provided text is")
        assert ("<|im_start|>assistant" in text) == chat
    # Same seed, same needle; its place follows the depth (to a verse boundary).
    assert (shallow.key, shallow.value) == (deep.key, deep.value)
    assert abs(shallow.depth - 0.1) < 0.1 and abs(deep.depth - 0.9) < 0.1
    at_shallow = _needle_at(tokenizer, shallow.token_ids, shallow.key, shallow.value)
    at_deep = _needle_at(tokenizer, deep.token_ids, deep.key, deep.value)
    assert at_shallow < 150 < 450 < at_deep


def test_distractors_have_their_own_keys(tokenizer) -> None:
    prompt = needle_prompt(tokenizer, 800, 0.5, 4, 6, True, np.random.default_rng(7))
    text = tokenizer.decode(prompt.token_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert text.count(f"special magic numbers for {prompt.key} is") == 1


def test_load_is_deterministic_and_carries_answers(tokenizer) -> None:
    load = LoadParams.model_validate({"prompt_source": "needle", "num_requests": 3, "input_len": 300, "seed": 5,
                                      "needle": {"depths": [0.2, 0.8]}})
    first, again = build_load(load, len(tokenizer), tokenizer), build_load(load, len(tokenizer), tokenizer)
    assert [r.prompt_token_ids for r in first] == [r.prompt_token_ids for r in again]
    assert all(r.answer and r.answer in r.prompt_text for r in first)
    assert len({r.answer for r in first}) == 3
    other = build_load(load.model_copy(update={"seed": 6}), len(tokenizer), tokenizer)
    assert [r.answer for r in other] != [r.answer for r in first]


def test_too_short_a_context_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="load.input_len 60 is too short for a needle prompt; use at least"):
        needle_prompt(tokenizer, 60, 0.5, 1, 7, True, np.random.default_rng(0))


def test_scoring_is_exact_match_of_the_first_number() -> None:
    assert needle_correct(" 6732655.<|im_end|>", "6732655")
    assert not needle_correct(" 673265. 6732655", "6732655")  # the first number is the answer
    assert not needle_correct(" 67326551", "6732655") and not needle_correct(" none", "6732655")

    class Digits:
        def decode(self, ids: list[int]) -> str:
            return " ".join(str(i) for i in ids)

    specs = [RequestSpec(f"r{i}", 0.0, [1], 4, answer=a) for i, a in enumerate(["12", "34", None, "56"])]
    records = [RequestRecord("r0", 0.0, output_token_ids=[12]), RequestRecord("r1", 0.0, output_token_ids=[35]),
               RequestRecord("r2", 0.0), RequestRecord("r3", 0.0, output_token_ids=[56], error="HTTP 500")]
    results = needle_results(specs, records, Digits())
    assert results == [True, False, None, False] and needle_accuracy(results) == pytest.approx(1 / 3)
    assert needle_accuracy([None, None]) is None


@pytest.mark.parametrize(
    ("load", "message"),
    [
        ({"needle": {"num_keys": 2}}, "load.needle is only read when load.prompt_source is 'needle'"),
        ({"prompt_source": "needle", "needle": {"depths": [0.5, 1.5]}}, r"load.needle.depths must lie in \[0, 1\]"),
        ({"prompt_source": "needle", "needle": {"depths": []}}, "at least 1 item"),
        ({"prompt_source": "needle", "needle": {"deep": 1}}, "Extra inputs are not permitted"),
    ],
)
def test_needle_params_are_validated(load: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServingParams.model_validate({"model": "smollm2-135m", "weights": "real", "load": load})


@pytest.mark.slow
def test_full_cache_retrieves_and_a_small_window_loses_the_needle(ctx) -> None:
    """Served outputs are scored: full finds every mid-context needle, a 10% streaming window none."""
    kind = ServingKind()
    accuracy = {}
    for backend in ("full", "streaming"):
        params = ServingParams.model_validate({
            "model": "smollm2-135m", "weights": "real", "backend": backend, "policy": {"kv_budget": 0.1},
            "engine": {"max_num_seqs": 4, "max_model_len": 1024},
            "load": {"arrival": "constant", "request_rate": 100.0, "num_requests": 2, "input_len": 384,
                     "output_len": 10, "ignore_eos": False, "prompt_source": "needle", "needle": {"depths": [0.4, 0.6]}},
            "quality": {"enabled": False},
        })
        out = kind.run_alone(params, ctx)
        (summary,) = out.tables["serving_summary"].to_pylist()
        accuracy[backend] = summary["needle_accuracy"]
        assert out.tables["requests"].column("needle_correct").to_pylist() == [accuracy[backend] == 1.0] * 2
    assert accuracy == {"full": 1.0, "streaming": 0.0}
