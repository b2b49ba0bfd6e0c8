"""Engine-side samples from vLLM's own Prometheus ``/metrics`` endpoint.

vLLM exports gauges for running and waiting requests and the fraction of KV blocks in use, a
counter of preemptions, and its cache configuration (block size, number of blocks) as labels of
``vllm:cache_config_info``. A background thread scrapes them at a fixed interval while a load
runs and turns each scrape into a row of the ``engine_steps`` table (same columns as our
engine's per-step rows; ``step`` is the sample index). KV bytes = blocks in use x block size x
KV bytes per token; vLLM keeps the whole cache on the device, so host bytes and host->device
traffic are 0. Our Serve app exports the same names plus ``orch:`` byte gauges and counters,
which take precedence when present.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass

import httpx

_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # fraction 0..1; older name second
PREEMPTIONS = "vllm:num_preemptions_total"
CACHE_INFO = "vllm:cache_config_info"
# Exported by our own Serve app (backends/kvcache/serve.py), whose policies may keep KV on the host.
KV_BYTES_DEVICE = "orch:kv_bytes_device"
KV_BYTES_HOST = "orch:kv_bytes_host"
H2D_BYTES = "orch:h2d_bytes_total"


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition -> metric name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        labels = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"] or "")}
        try:
            value = float(match["value"])
        except ValueError:
            continue
        out.setdefault(match["name"], []).append((labels, value))
    return out


def _sum(metrics: dict[str, list[tuple[dict[str, str], float]]], *names: str) -> float | None:
    """Sum of a metric over its label sets (engines, models); the first name present wins."""
    for name in names:
        if name in metrics:
            return sum(v for _, v in metrics[name])
    return None


@dataclass(frozen=True)
class CacheShape:
    """The KV cache vLLM allocated: how many blocks of how many tokens."""

    num_blocks: int
    block_size: int


def cache_shape(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> CacheShape | None:
    """Blocks and block size from ``vllm:cache_config_info`` labels, when exported."""
    for labels, _ in metrics.get(CACHE_INFO, []):
        blocks = labels.get("num_gpu_blocks")
        if blocks not in (None, "None") and labels.get("block_size") not in (None, "None"):
            return CacheShape(int(blocks), int(labels["block_size"]))
    return None


@dataclass(frozen=True)
class Baseline:
    """Counter values when the run started (rows report counts since then)."""

    preemptions: float = 0.0
    h2d_bytes: float = 0.0

    @classmethod
    def of(cls, metrics: dict[str, list[tuple[dict[str, str], float]]]) -> Baseline:
        """The counters of one scrape."""
        return cls(_sum(metrics, PREEMPTIONS) or 0.0, _sum(metrics, H2D_BYTES) or 0.0)


def step_row(
    step: int, t_s: float, metrics: dict[str, list[tuple[dict[str, str], float]]],
    shape: CacheShape | None, kv_bytes_per_token: int, start: Baseline, previous: Baseline,
) -> dict:
    """One ``engine_steps`` row from one scrape (counters relative to ``start`` and ``previous``)."""
    usage = _sum(metrics, *KV_USAGE)
    blocks = int(round(usage * shape.num_blocks)) if usage is not None and shape is not None else None
    device_bytes = _sum(metrics, KV_BYTES_DEVICE)
    if device_bytes is None and blocks is not None:
        device_bytes = blocks * shape.block_size * kv_bytes_per_token
    now = Baseline.of(metrics)
    running = _sum(metrics, RUNNING)
    waiting = _sum(metrics, WAITING)
    return {
        "step": step,
        "t_s": t_s,
        "running": int(running) if running is not None else None,
        "waiting": int(waiting) if waiting is not None else None,
        "kv_blocks_used": blocks,
        "kv_bytes_device": int(device_bytes) if device_bytes is not None else None,
        "kv_bytes_host": int(_sum(metrics, KV_BYTES_HOST) or 0),
        "h2d_bytes": int(now.h2d_bytes - previous.h2d_bytes),
        "preemptions": int(now.preemptions - previous.preemptions),
        "h2d_bytes_total": int(now.h2d_bytes - start.h2d_bytes),
        "preemptions_total": int(now.preemptions - start.preemptions),
    }


class PrometheusStepSampler:
    """Scrapes a vLLM-style ``/metrics`` endpoint in a thread while a load runs."""

    def __init__(self, metrics_url: str, kv_bytes_per_token: int, interval_s: float = 0.2):
        if not interval_s > 0 or math.isinf(interval_s):
            raise ValueError(f"interval_s must be a positive number of seconds; got {interval_s}")
        self.metrics_url = metrics_url
        self.kv_bytes_per_token = kv_bytes_per_token
        self.interval_s = interval_s
        self._rows: list[dict] = []
        self._origin = 0.0  # t_s of a sample is seconds after this (perf_counter)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=5.0, trust_env=False)

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """One scrape of the endpoint, parsed."""
        response = self._client.get(self.metrics_url)
        response.raise_for_status()
        return parse_prometheus(response.text)

    def start(self) -> None:
        """Take a baseline scrape, then sample every ``interval_s`` until ``stop``."""
        self.stop()
        self._rows = []
        self._stop.clear()
        first = self.scrape()
        baseline = Baseline.of(first)
        shape = cache_shape(first)
        self._origin = time.perf_counter()  # until align() names the load's start
        self._thread = threading.Thread(
            target=self._loop, args=(baseline, shape), name="vllm-metrics", daemon=True
        )
        self._thread.start()

    def align(self, t0: float) -> None:
        """Measure ``t_s`` from ``t0``, the load's start, so samples share the requests' clock."""
        self._origin = t0

    def _loop(self, baseline: Baseline, shape: CacheShape | None) -> None:
        previous = baseline
        step = 0
        stopping = False
        while True:
            try:
                metrics = self.scrape()
            except httpx.HTTPError:
                metrics = None  # a busy server may miss a scrape; the next one counts
            if metrics is not None:
                row = step_row(step, time.perf_counter() - self._origin, metrics, shape, self.kv_bytes_per_token,
                               baseline, previous)
                previous = Baseline.of(metrics)
                self._rows.append(row)
                step += 1
            if stopping:
                return
            # One more scrape once told to stop: the last row's counters are the trial's totals
            # (H2D bytes, preemptions), which would otherwise miss up to an interval's worth.
            stopping = self._stop.wait(self.interval_s)

    def rows(self) -> list[dict]:
        """The rows sampled so far since ``start``."""
        return list(self._rows)

    def stop(self) -> list[dict]:
        """Stop sampling after one last scrape; the rows sampled since ``start``."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return list(self._rows)

    def close(self) -> None:
        """Stop and release the HTTP client."""
        self.stop()
        self._client.close()
