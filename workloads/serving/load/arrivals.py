"""Arrival processes: when each request of an open-loop load is sent.

Every process returns scheduled send times in seconds after the load's start, non-decreasing,
with the first request at t = 0 (no idle lead-in before the first request). Inter-arrival gaps
are drawn from the seeded generator passed in, so a load is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ArrivalProcess = Callable[[int, float, float, np.random.Generator], np.ndarray]


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    """Arrival times from the n-1 gaps between n requests (first request at t = 0)."""
    return np.concatenate([[0.0], np.cumsum(gaps)])


def poisson_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1/rate (``burstiness`` is ignored)."""
    if math.isinf(rate):
        return np.zeros(n)
    return _from_gaps(rng.exponential(1.0 / rate, size=n - 1))


def gamma_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma renewal process: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    The mean gap is 1/rate whatever the burstiness; the gaps' coefficient of variation is
    1/sqrt(burstiness): below 1 burstier than Poisson, above 1 more regular (as vLLM's
    ``--burstiness``).
    """
    if math.isinf(rate):
        return np.zeros(n)
    return _from_gaps(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1))


def constant_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced arrivals, 1/rate apart."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.arange(n, dtype=float) / rate


# The ``trace`` arrival is not a process: its times come from the trace file (workloads/serving/load/trace.py).
ARRIVAL_PROCESSES: dict[str, ArrivalProcess] = {
    "poisson": poisson_arrivals,
    "gamma": gamma_arrivals,
    "constant": constant_arrivals,
}


def arrival_times(name: str, n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Scheduled send times of ``n`` requests from the process called ``name``."""
    try:
        process = ARRIVAL_PROCESSES[name]
    except KeyError:
        raise ValueError(f"unknown arrival process {name!r}; allowed: {', '.join(ARRIVAL_PROCESSES)}") from None
    if n < 1:
        raise ValueError(f"number of requests must be >= 1; got {n}")
    return process(n, rate, burstiness, rng)
