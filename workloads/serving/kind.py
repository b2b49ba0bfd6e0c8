"""The ``serving`` trial kind: an open-loop load against one system under test.

``open`` builds the system (our engine with one cache policy, or vLLM) from the systems
registry; trials that differ only in load, SLO, percentile or quality keys share it. ``run``
generates the load, sends it through the chosen transport, turns the request records into
vLLM-standard metrics, samples the engine's steps, and for lossy policies measures quality
against the full cache on real text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from workloads.kind import TrialContext, TrialKind, TrialOutput
from workloads.registry import KINDS
from workloads.serving.live import IntervalMonitor
from workloads.serving.load import build_load
from workloads.serving.metrics.latency import compute_metrics, request_metrics, request_succeeded
from workloads.serving.metrics.needle import needle_accuracy, needle_results
from workloads.serving.metrics.quality import (
    QualityResult,
    QualityRun,
    compare,
    quality_passages,
    run_quality,
)
from workloads.serving.metrics.tables import TABLES, to_table
from workloads.serving.params import LoadParams, QualityParams, ServingParams, SloParams
from workloads.serving.systems import ReportsMemory, SystemUnderTest, open_system, vocab_size_of
from workloads.serving.transports.base import RequestRecord

__all__ = ["ServingKind", "ServingParams", "ServingSession"]


def _section_keys(prefix: str, model: type) -> set[str]:
    return {f"{prefix}.{name}" for name in model.model_fields}


@dataclass
class ServingSession:
    """What trials of one engine group share: the running system and the full-cache reference."""

    system: SystemUnderTest
    params: ServingParams
    # Quality of the full cache on the quality passages, by (num_texts, text_len, prompt_len).
    quality_reference: dict[tuple[int, int, int], QualityRun] = field(default_factory=dict)
    # A local engine for quality when the system's own engine is out of reach (served over HTTP).
    quality_engine: Any = None


@KINDS.register
class ServingKind(TrialKind):
    """Serving trials: latency, throughput, memory and quality of a KV-cache backend under load."""

    name = "serving"
    params_model = ServingParams
    tables: ClassVar = TABLES
    load_keys: ClassVar[frozenset[str]] = frozenset(
        _section_keys("load", LoadParams)
        | _section_keys("slo", SloParams)
        | _section_keys("quality", QualityParams)
        | {"load", "slo", "quality", "percentiles"}
    )
    path_keys: ClassVar[frozenset[str]] = frozenset({"load.trace", "backend.python"})
    # What `orch report` shows side by side (all columns stay in the Parquet dataset).
    report_columns: ClassVar[dict[str, list[str]]] = {
        "serving_summary": [
            "completed", "failed", "request_throughput", "output_throughput",
            "ttft_ms_mean", "ttft_ms_p99", "tpot_ms_mean", "itl_ms_p99", "e2el_ms_mean",
            "peak_kv_bytes", "peak_kv_bytes_steps", "peak_kv_bytes_host", "h2d_bytes", "preemptions",
            "ppl_ratio", "token_agreement", "needle_accuracy",
        ]
    }

    def open(self, params: ServingParams) -> ServingSession:
        """Start the system under test (loads the model)."""
        return ServingSession(system=open_system(params), params=params)

    def close(self, session: ServingSession) -> None:
        """Stop the system under test."""
        if session is not None:
            session.system.close()

    def serve(self, params: ServingParams, host: str, port: int) -> str:
        """Deploy our engine with this trial's model and cache policy behind Ray Serve."""
        from backends.kvcache.serve import deploy
        from workloads.serving.systems.engine import engine_config

        if params.backend.name == "vllm":
            raise NotImplementedError("orch serve deploys our engine's policies; serve vLLM with `vllm serve`")
        return deploy(engine_config(params), host=host, port=port, name="orch")

    def run(self, session: ServingSession, params: ServingParams, ctx: TrialContext) -> TrialOutput:
        """Send the trial's load, measure, and return the serving tables."""
        system = session.system
        requests = build_load(params.load, vocab_size_of(system), system.tokenizer())
        transport_kind = system.default_transport if params.transport == "auto" else params.transport
        transport = system.transport(transport_kind)
        if isinstance(system, ReportsMemory):
            system.reset_peaks()
        with IntervalMonitor(transport, ctx.report):
            records = transport.run(requests, params.load.max_concurrency)
        steps = transport.engine_steps()
        if records and not any(request_succeeded(r) for r in records):
            # Nothing was measured: a 'done' trial with zero completions would read as a result.
            first = next((r.error for r in records if r.error), "no first token")
            raise RuntimeError(f"every request failed ({len(records)}); the first: {first}")
        metrics = compute_metrics(records, slo_s=params.slo.as_seconds())
        needles = needle_results(requests, records, system.tokenizer())

        summary: dict[str, Any] = {
            "backend": system.name,
            "transport": transport_kind,
            "block_size": system.block_size(),
            "num_requests": len(records),
            **metrics.summary(),
            "max_send_lag_s": max((r.send_s - r.arrival_s for r in records if r.send_s is not None), default=None),
            **self._memory(system, steps),
            "engine_steps": len(steps),
            "needle_accuracy": needle_accuracy(needles),
        }
        ctx.report({k: float(summary[k]) for k in ("completed", "output_throughput", "ttft_ms_mean")})

        quality = self._quality(session, params) if params.quality_enabled() else None
        if quality is not None:
            summary.update(
                ppl=quality.ppl, ppl_ref=quality.ppl_ref, ppl_ratio=quality.ppl_ratio,
                token_agreement=quality.token_agreement,
            )

        return TrialOutput(
            tables={
                "requests": to_table("requests", self._request_rows(system.name, records, needles)),
                "engine_steps": to_table("engine_steps", steps),
                "serving_summary": to_table("serving_summary", [_nan_to_null(summary)]),
                "serving_percentiles": to_table("serving_percentiles", metrics.percentile_rows(params.percentiles)),
            }
        )

    @staticmethod
    def _request_rows(backend: str, records: list[RequestRecord], needles: list[bool | None]) -> list[dict]:
        rows = []
        for r, needle in zip(records, needles, strict=True):
            m = request_metrics(r)
            rows.append(
                {
                    "request_id": r.request_id,
                    "backend": backend,
                    "arrival_s": r.arrival_s,
                    "send_s": r.send_s,
                    "first_token_s": r.first_token_s,
                    "finish_s": r.finish_s,
                    "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens or len(r.token_times_s),
                    "ttft_s": m.ttft_s,
                    "tpot_s": m.tpot_s,
                    "e2el_s": m.e2el_s,
                    "itl_s": m.itl_s,
                    "error": r.error if r.error is not None else (None if m.success else "no token received"),
                    "needle_correct": needle,
                }
            )
        return rows

    @staticmethod
    def _memory(system: SystemUnderTest, steps: list[dict]) -> dict[str, Any]:
        """Peak KV and device bytes (the system's own peaks when it reports them), bytes moved."""
        # a /metrics without vLLM's cache shape gives samples with no KV bytes: not a peak of 0
        sampled_kv = max((s["kv_bytes_device"] for s in steps if s["kv_bytes_device"] is not None), default=None)
        memory: dict[str, Any] = {
            "peak_kv_bytes": sampled_kv,
            "peak_kv_bytes_steps": sampled_kv,
            "peak_kv_bytes_host": max((s["kv_bytes_host"] for s in steps), default=None),
            "peak_device_bytes": None,
            "h2d_bytes": steps[-1]["h2d_bytes_total"] if steps else None,
            "preemptions": steps[-1]["preemptions_total"] if steps else None,
        }
        if isinstance(system, ReportsMemory):
            peaks = system.memory_peaks()
            memory["peak_kv_bytes"] = max(peaks["peak_kv_bytes"], sampled_kv or 0)
            memory["peak_device_bytes"] = peaks["peak_device_bytes"]
        return memory

    @staticmethod
    def _quality(session: ServingSession, params: ServingParams) -> QualityResult:
        """Quality of the session's engine against a full-cache engine on the same weights."""
        from workloads.serving.systems.engine import build_engine

        system = session.system
        engine = getattr(system, "engine", None)
        if engine is None:
            if session.quality_engine is None:
                session.quality_engine = build_engine(params)
            engine = session.quality_engine
        q = params.quality
        prompt_len = q.resolved_prompt_len()
        passages = quality_passages(system.tokenizer(), q)
        key = (q.num_texts, q.text_len, prompt_len)
        if key not in session.quality_reference:
            reference_engine = build_engine(params, policy="full")
            session.quality_reference[key] = run_quality(reference_engine, passages, prompt_len)
            del reference_engine
        policy_run = run_quality(engine, passages, prompt_len)
        return compare(policy_run, session.quality_reference[key])


def _nan_to_null(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (undefined, e.g. a rate over a zero duration) is stored as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
