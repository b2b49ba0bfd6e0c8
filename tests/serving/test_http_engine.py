"""``transport: http`` for our engine: the same load through Ray Serve's OpenAI endpoint."""

from __future__ import annotations

import pytest

from workloads.serving.kind import ServingKind, ServingParams


@pytest.fixture
def local_ray():
    """A fresh loopback Ray for Serve, shut down afterwards."""
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_engine_served_over_http_gives_the_same_tables(tiny_model: str, ctx, local_ray) -> None:
    kind = ServingKind()
    params = ServingParams.model_validate({
        "model": tiny_model, "backend": "full", "transport": "http",
        "engine": {"max_num_seqs": 4, "max_model_len": 128},
        "load": {"arrival": "poisson", "request_rate": 20.0, "num_requests": 6, "input_len": 16, "output_len": 5},
    })
    session = kind.open(params)
    try:
        with pytest.raises(ValueError, match="over HTTP"):
            session.system.transport("inprocess")
        out = kind.run(session, params, ctx)
    finally:
        kind.close(session)
        kind.close(session)  # idempotent
    requests = out.tables["requests"].to_pylist()
    assert len(requests) == 6 and all(r["error"] is None for r in requests)
    assert all(r["output_tokens"] == 5 and len(r["itl_s"]) == 4 for r in requests)
    (summary,) = out.tables["serving_summary"].to_pylist()
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (6, 0, 30)
    assert summary["ttft_ms_mean"] > 0 and summary["output_throughput"] > 0
    # the served engine's own peaks, as in process (weights + K/V + activations > K/V > 0)
    assert summary["peak_device_bytes"] > summary["peak_kv_bytes"] > 0
