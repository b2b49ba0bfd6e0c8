"""Arrival processes: when each request of an open-loop load is sent.

Every process returns scheduled send times in seconds after the load's start (t = 0),
non-decreasing, built as ``vllm bench serve`` builds its schedule so that throughputs compare:
every request, the first included, waits one inter-arrival gap after the previous one, and a
random schedule is then scaled so that its last request is sent at exactly n / rate. The scaling
makes the offered load the nominal rate for every seed (unscaled, the last of 12 Poisson arrivals
at 1/s falls between 6.9 and 18.2 s for 9 seeds in 10); the gaps keep their shape. Gaps are drawn from the seeded
generator passed in, so a load is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ArrivalProcess = Callable[[int, float, float, np.random.Generator], np.ndarray]


def _from_gaps(gaps: np.ndarray, rate: float) -> np.ndarray:
    """Arrival times from the n gaps before each of n requests, scaled to end at n / rate."""
    times = np.cumsum(gaps)
    return times * (len(gaps) / rate / times[-1]) if times[-1] > 0 else times


def poisson_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1/rate (``burstiness`` is ignored)."""
    if math.isinf(rate):
        return np.zeros(n)
    return _from_gaps(rng.exponential(1.0 / rate, size=n), rate)


def gamma_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma renewal process: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    The mean gap is 1/rate whatever the burstiness; the gaps' coefficient of variation is
    1/sqrt(burstiness): below 1 burstier than Poisson, above 1 more regular (as vLLM's
    ``--burstiness``).
    """
    if math.isinf(rate):
        return np.zeros(n)
    return _from_gaps(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n), rate)


def constant_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced arrivals, 1/rate apart, the first 1/rate after the start."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.arange(1, n + 1, dtype=float) / rate


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
