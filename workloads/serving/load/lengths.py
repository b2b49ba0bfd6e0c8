"""Length distributions for prompt and output lengths (in tokens).

Each distribution is parameterised by its mean and a ``spread``; samples are rounded to
integers and clipped to [1, upper] (``upper`` is e.g. the model's context budget).
- fixed: always the mean.
- uniform: integers uniform in [mean*(1-spread), mean*(1+spread)] (spread in [0, 1]).
- normal: N(mean, (spread*mean)^2).
- lognormal: exp(N(mu, spread^2)) with mu chosen so the mean is ``mean``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LengthSampler = Callable[[int, float, float, np.random.Generator], np.ndarray]


def fixed_lengths(n: int, mean: float, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Every sample equals the mean."""
    return np.full(n, float(mean))


def uniform_lengths(n: int, mean: float, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Integers uniform over [mean*(1-spread), mean*(1+spread)], both ends included."""
    if spread > 1:
        raise ValueError(f"uniform spread must be in [0, 1]; got {spread}")
    low = int(round(mean * (1 - spread)))
    high = int(round(mean * (1 + spread)))
    return rng.integers(low, high + 1, size=n).astype(float)


def normal_lengths(n: int, mean: float, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Normal with standard deviation ``spread * mean``."""
    return rng.normal(mean, spread * mean, size=n)


def lognormal_lengths(n: int, mean: float, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Log-normal with sigma ``spread`` and mean ``mean`` (heavy right tail, like chat traffic)."""
    mu = np.log(mean) - spread**2 / 2.0
    return rng.lognormal(mu, spread, size=n)


LENGTH_DISTRIBUTIONS: dict[str, LengthSampler] = {
    "fixed": fixed_lengths,
    "uniform": uniform_lengths,
    "normal": normal_lengths,
    "lognormal": lognormal_lengths,
}


def sample_lengths(
    name: str, n: int, mean: int, spread: float, rng: np.random.Generator, upper: int | None = None
) -> list[int]:
    """``n`` integer lengths from the distribution called ``name``, clipped to [1, upper]."""
    try:
        sampler = LENGTH_DISTRIBUTIONS[name]
    except KeyError:
        allowed = ", ".join(LENGTH_DISTRIBUTIONS)
        raise ValueError(f"unknown length distribution {name!r}; allowed: {allowed}") from None
    raw = np.rint(sampler(n, float(mean), float(spread), rng))
    clipped = np.clip(raw, 1, upper if upper is not None else np.inf)
    return [int(x) for x in clipped]
