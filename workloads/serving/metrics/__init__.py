"""What a serving trial measures: latency and throughput (vLLM's definitions), output quality
against the full cache, and the Arrow schemas of the tables they fill."""

from workloads.serving.metrics.latency import (
    LATENCY_METRICS,
    ServingMetrics,
    benchmark_duration,
    compute_metrics,
    request_metrics,
)

__all__ = ["LATENCY_METRICS", "ServingMetrics", "benchmark_duration", "compute_metrics", "request_metrics"]
