"""The serving kind end to end on our engine: tables, schemas, sane values, quality."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from workloads.registry import resolve_kind
from workloads.serving.kind import ServingKind, ServingParams
from workloads.serving.load import build_load
from workloads.serving.metrics.tables import SCHEMA_VERSION, TABLES
from workloads.serving.systems.engine import EngineSystem


def _params(model: str, **overrides) -> ServingParams:
    raw = {
        "model": model,
        "backend": "full",
        "engine": {"max_num_seqs": 8, "max_model_len": 128},
        "load": {"arrival": "poisson", "request_rate": 40.0, "num_requests": 12, "input_len": 24,
                 "input_dist": "uniform", "input_spread": 0.5, "output_len": 6, "seed": 3},
        "slo": {"ttft_ms": 10_000, "tpot_ms": 10_000},
        "percentiles": [50, 75, 99],
    }
    for key, value in overrides.items():
        raw[key] = value
    return ServingParams.model_validate(raw)


def test_kind_is_registered() -> None:
    assert isinstance(resolve_kind("serving"), ServingKind)


def test_inprocess_transport_on_a_tiny_dummy_model(tiny_model: str) -> None:
    # All at t = 0, so that requests are in the engine together whatever the host's speed (at
    # 40 requests/s a fast step can finish each request before the next one arrives).
    params = _params(tiny_model, load={**_params(tiny_model).load.model_dump(), "request_rate": float("inf")})
    system = EngineSystem(params)
    try:
        load = build_load(params.load, system.vocab_size)
        transport = system.transport("inprocess")
        records = transport.run(load, max_concurrency=None)
        steps = transport.engine_steps()
    finally:
        system.close()
    assert [r.request_id for r in records] == [r.request_id for r in load]
    for spec, rec in zip(load, records, strict=True):
        assert rec.error is None
        assert rec.output_tokens == spec.max_tokens == len(rec.output_token_ids) == len(rec.token_times_s)
        assert rec.prompt_tokens == len(spec.prompt_token_ids)
        assert rec.arrival_s <= rec.send_s < rec.first_token_s <= rec.finish_s
        assert rec.token_times_s == sorted(rec.token_times_s) and rec.finish_s == rec.token_times_s[-1]
        assert all(0 <= t < 512 for t in rec.output_token_ids)
    assert [s["step"] for s in steps] == list(range(len(steps)))
    bytes_per_token = system_bytes_per_token(params)
    assert max(s["kv_bytes_device"] for s in steps) > 0
    assert all(s["kv_bytes_device"] % bytes_per_token == 0 for s in steps)
    assert max(s["running"] for s in steps) >= 2  # continuous batching served requests together
    assert steps[-1]["running"] == steps[-1]["waiting"] == 0
    assert all(s["kv_bytes_host"] == 0 and s["h2d_bytes"] == 0 for s in steps)  # full: all on device


def system_bytes_per_token(params: ServingParams) -> int:
    """2 x layers x kv_heads x head_dim x 4 bytes for the tiny fp32 model."""
    return 2 * 2 * 2 * (64 // 4) * 4


def test_run_produces_tables_that_conform_to_the_schemas(tiny_model: str, ctx) -> None:
    kind = ServingKind()
    params = _params(tiny_model)
    session = kind.open(params)
    try:
        out = kind.run(session, params, ctx)
        # A second trial of the same engine group reuses the session.
        second = kind.run(session, _params(tiny_model, load={**params.load.model_dump(), "seed": 4}), ctx)
    finally:
        kind.close(session)
    assert set(out.tables) == set(TABLES)
    for name, table in out.tables.items():
        assert isinstance(table, pa.Table)
        assert table.schema.equals(TABLES[name], check_metadata=True), name
        assert table.schema.metadata[b"schema_version"] == SCHEMA_VERSION.encode()

    requests = out.tables["requests"].to_pylist()
    assert len(requests) == 12 and all(r["error"] is None and r["backend"] == "full" for r in requests)
    for r in requests:
        assert r["output_tokens"] == 6 and len(r["itl_s"]) == 5
        assert r["ttft_s"] > 0 and r["e2el_s"] >= r["ttft_s"]
        assert r["tpot_s"] == pytest.approx((r["e2el_s"] - r["ttft_s"]) / 5)

    (summary,) = out.tables["serving_summary"].to_pylist()
    assert (summary["completed"], summary["failed"], summary["num_requests"]) == (12, 0, 12)
    assert summary["total_output_tokens"] == 72
    assert params.engine.block_size is None and summary["block_size"] == 16  # our engine's default, recorded
    assert summary["total_input_tokens"] == sum(r["prompt_tokens"] for r in requests)
    assert summary["duration_s"] == pytest.approx(max(r["finish_s"] for r in requests))
    assert summary["output_throughput"] == pytest.approx(72 / summary["duration_s"])
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])  # generous SLOs: all good
    assert 0 < summary["ttft_ms_p50"] <= summary["ttft_ms_p90"] <= summary["ttft_ms_p99"]
    assert summary["peak_kv_bytes"] > 0 and summary["peak_kv_bytes"] % system_bytes_per_token(params) == 0
    assert summary["peak_device_bytes"] >= summary["peak_kv_bytes"]
    assert summary["max_send_lag_s"] < 0.5
    assert summary["ppl_ratio"] is None  # dummy weights: no quality
    assert summary["engine_steps"] == out.tables["engine_steps"].num_rows > 0

    rows = out.tables["serving_percentiles"].to_pylist()
    assert {(r["metric"], r["percentile"]) for r in rows} == {
        (m, p) for m in ("ttft", "tpot", "itl", "e2el") for p in (50.0, 75.0, 99.0)
    }
    assert second.tables["serving_summary"].column("completed")[0].as_py() == 12
    assert ctx.report is not None


def test_overlong_requests_become_error_rows(tiny_model: str, ctx) -> None:
    kind = ServingKind()
    params = _params(
        tiny_model,
        engine={"max_num_seqs": 4, "max_model_len": 64},
        load={"arrival": "constant", "request_rate": 100.0, "num_requests": 6, "input_len": 40,
              "input_dist": "uniform", "input_spread": 1.0, "output_len": 4, "seed": 1},
    )
    out = kind.run_alone(params, ctx)
    requests = out.tables["requests"].to_pylist()
    too_long = [r for r in requests if r["prompt_tokens"] + 4 > 64]
    assert too_long, "the seed should draw some prompts longer than the context"
    assert all(r["error"] for r in too_long) and all(r["ttft_s"] is None for r in too_long)
    (summary,) = out.tables["serving_summary"].to_pylist()
    assert summary["failed"] == len(too_long) and summary["completed"] == 6 - len(too_long)


def test_a_trial_whose_every_request_failed_fails_with_the_first_reason(tiny_model: str, ctx) -> None:
    params = _params(tiny_model, engine={"max_model_len": 8},
                     load={"arrival": "constant", "request_rate": 100.0, "num_requests": 2, "input_len": 16,
                           "output_len": 2})
    with pytest.raises(RuntimeError, match=r"every request failed \(2\); the first: .*exceeds max_model_len"):
        ServingKind().run_alone(params, ctx)


@pytest.mark.slow
def test_quality_of_full_against_full_is_exactly_one(ctx) -> None:
    kind = ServingKind()
    params = ServingParams.model_validate({
        "model": "smollm2-135m", "weights": "real", "backend": "full",
        "engine": {"max_num_seqs": 4, "max_model_len": 256},
        "load": {"arrival": "constant", "request_rate": 50.0, "num_requests": 2, "input_len": 16,
                 "output_len": 2, "prompt_source": "corpus"},
        "quality": {"enabled": True, "num_texts": 2, "text_len": 40, "prompt_len": 24},
    })
    session = kind.open(params)
    try:
        out = kind.run(session, params, ctx)
        tokenizer = session.system.tokenizer()
    finally:
        kind.close(session)
    (summary,) = out.tables["serving_summary"].to_pylist()
    assert summary["ppl_ratio"] == 1.0 and summary["token_agreement"] == 1.0
    assert 1.0 < summary["ppl"] < 1000 and summary["ppl"] == summary["ppl_ref"]
    assert not math.isnan(summary["ppl"])
    # Corpus prompts are real KJV text.
    from workloads.serving.load.corpus import verses

    load = build_load(params.load, len(tokenizer), tokenizer)
    text = load[0].prompt_text
    assert text and any(text.strip()[:20] in v for v in verses())


def test_memory_summary_skips_samples_without_kv_bytes() -> None:
    # vLLM's /metrics without its cache shape gives rows whose KV bytes are unknown (None)
    steps = [{"kv_bytes_device": None, "kv_bytes_host": 0, "h2d_bytes_total": 0, "preemptions_total": 0},
             {"kv_bytes_device": 2048, "kv_bytes_host": 0, "h2d_bytes_total": 0, "preemptions_total": 1}]
    memory = ServingKind._memory(object(), steps)
    assert memory["peak_kv_bytes"] == 2048 and memory["preemptions"] == 1
    assert ServingKind._memory(object(), steps[:1])["peak_kv_bytes"] is None
