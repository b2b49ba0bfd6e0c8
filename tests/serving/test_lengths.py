"""Length distributions of prompts and outputs."""

from __future__ import annotations

import numpy as np
import pytest

from workloads.serving.load import build_load
from workloads.serving.load.lengths import sample_lengths
from workloads.serving.params import LoadParams

N = 20_000


def _sample(name: str, mean: int, spread: float, upper: int | None = None) -> np.ndarray:
    return np.asarray(sample_lengths(name, N, mean, spread, np.random.default_rng(0), upper))


def test_fixed() -> None:
    assert set(_sample("fixed", 64, 0.7)) == {64}


def test_uniform_covers_its_range_evenly() -> None:
    x = _sample("uniform", 100, 0.5)
    assert x.min() == 50 and x.max() == 150
    assert x.mean() == pytest.approx(100, rel=0.01)
    assert x.std() == pytest.approx(101 / np.sqrt(12), rel=0.03)  # discrete uniform over 101 values


def test_normal_mean_and_std() -> None:
    x = _sample("normal", 200, 0.1)
    assert x.mean() == pytest.approx(200, rel=0.01)
    assert x.std() == pytest.approx(20, rel=0.03)


def test_lognormal_mean_and_tail() -> None:
    x = _sample("lognormal", 100, 0.8)
    assert x.mean() == pytest.approx(100, rel=0.04)
    assert np.median(x) == pytest.approx(100 * np.exp(-0.8**2 / 2), rel=0.04)  # median below the mean
    assert np.percentile(x, 99) > 4 * np.median(x)


def test_lengths_are_integers_clipped_to_bounds() -> None:
    x = _sample("normal", 10, 2.0, upper=15)
    assert x.dtype.kind == "i"
    assert x.min() == 1 and x.max() == 15


def test_unknown_distribution_and_bad_spread() -> None:
    with pytest.raises(ValueError, match="allowed: fixed, uniform, normal, lognormal"):
        sample_lengths("zipf", 3, 10, 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"uniform spread must be in \[0, 1\]"):
        sample_lengths("uniform", 3, 10, 1.5, np.random.default_rng(0))


def test_load_uses_the_distributions_for_prompts_and_outputs() -> None:
    load = build_load(
        LoadParams(num_requests=400, input_len=40, input_dist="uniform", input_spread=0.25,
                   output_len=12, output_dist="normal", output_spread=0.2, seed=5),
        vocab_size=50,
    )
    inputs = np.array([len(r.prompt_token_ids) for r in load])
    outputs = np.array([r.max_tokens for r in load])
    assert inputs.min() >= 30 and inputs.max() <= 50 and inputs.mean() == pytest.approx(40, rel=0.05)
    assert outputs.mean() == pytest.approx(12, rel=0.05) and outputs.std() > 1
    assert all(r.ignore_eos for r in load)
