"""Serving parameters: the grid's keys, their defaults and their errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workloads.serving.kind import ServingKind, ServingParams
from workloads.serving.systems.engine import engine_config


def test_backend_as_name_or_mapping() -> None:
    assert ServingParams.model_validate({"backend": "h2o"}).backend.name == "h2o"
    vllm = ServingParams.model_validate({"backend": {"name": "vllm", "python": ".venv-vllm/bin/python"}})
    assert (vllm.backend.name, vllm.backend.python) == ("vllm", ".venv-vllm/bin/python")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"backend": "paged"}, "unknown backend 'paged'; allowed: full, h2o, infinigen, offload, streaming, vllm"),
        ({"load": {"rate": 3}}, "Extra inputs are not permitted"),
        ({"policy": {"kv_budget": 1.5}}, "less than or equal to 1"),
        ({"load": {"arrival": "trace"}}, "needs load.trace"),
        ({"percentiles": [50, 101]}, "percentiles must be"),
        ({"quality": {"text_len": 32, "prompt_len": 32}}, "prompt_len must be smaller"),
        # combinations a trial could not run (or would ignore) are refused here, not at engine build
        ({"backend": "h2o", "policy": {"kv_budget": 0.5, "recent_ratio": 0.1}},
         r"policy 'h2o': give kv_budget \(split evenly into heavy and recent\) or recent_ratio, not both"),
        ({"backend": "h2o", "policy": {"kv_budget": 0.2, "heavy_tokens": 5}},
         r"policy 'h2o': give the budget as fractions \(kv_budget\) or as token counts \(heavy_tokens\)"),
        ({"backend": "streaming", "policy": {"kv_budget": 0.2, "kv_budget_tokens": 64}},
         "policy 'streaming': give kv_budget .* or kv_budget_tokens .*, not both"),
        ({"engine": {"kv_cache_bytes": 10**6, "kv_cache_blocks": 10}},
         "give engine.kv_cache_bytes or engine.kv_cache_blocks, not both"),
        ({"load": {"output_dist": "uniform", "output_spread": 1.5}},
         r"load.output_spread must be in \[0, 1\] for output_dist 'uniform'"),
        ({"load": {"prompt_source": "corpus"}}, "load.prompt_source 'corpus' needs a tokenizer: use weights 'real'"),
        ({"model": "opt-125m", "weights": "real"}, "model 'opt-125m' is a preset without offline weights: use weights 'dummy'"),
    ],
)
def test_bad_parameters_are_rejected_with_the_reason(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServingParams.model_validate(raw)


def test_quality_defaults_to_lossy_policies_with_real_weights() -> None:
    def enabled(**raw) -> bool:
        return ServingParams.model_validate({"model": "smollm2-135m"} | raw).quality_enabled()

    assert enabled(backend="h2o", weights="real") and enabled(backend="streaming", weights="real")
    assert not enabled(backend="full", weights="real") and not enabled(backend="h2o", weights="dummy")
    assert enabled(backend="full", weights="real", quality={"enabled": True})
    assert not enabled(backend="vllm", weights="real", quality={"enabled": True})  # needs our engine


def test_shared_policy_section_gives_each_policy_its_own_knobs() -> None:
    raw = {"policy": {"min_tokens": 8, "heavy_ratio": 0.1, "recent_ratio": 0.2, "sink_tokens": 2},
           "engine": {"max_num_seqs": 3}}
    h2o = engine_config(ServingParams.model_validate({**raw, "backend": "h2o"}))
    streaming = engine_config(ServingParams.model_validate({**raw, "backend": "streaming"}))
    assert h2o.policy_params == {"min_tokens": 8, "heavy_ratio": 0.1, "recent_ratio": 0.2}
    assert streaming.policy_params == {"min_tokens": 8, "sink_tokens": 2}
    # a knob of another policy on the axis is not checked against this one
    assert ServingParams.model_validate({**raw, "backend": "full"}).policy_knobs("full") == {"min_tokens": 8}
    assert h2o.max_num_seqs == 3 and h2o.policy == "h2o"
    # The full-cache reference for quality keeps every token.
    assert engine_config(ServingParams.model_validate({**raw, "backend": "h2o"}), policy="full").policy_params == {}


def test_load_keys_cover_load_slo_quality_and_percentiles_only() -> None:
    keys = ServingKind.load_keys
    assert {"load.request_rate", "load.seed", "slo.ttft_ms", "percentiles", "quality.num_texts"} <= keys
    assert not any(k.startswith(("backend", "policy", "engine", "model")) for k in keys)


def test_grid_policy_knobs_are_exactly_the_union_of_the_policies_own() -> None:
    from backends.kvcache.policies import POLICIES
    from workloads.serving.params import PolicyParams

    own = set().union(*(policy.params_model.model_fields for policy in POLICIES.values()))
    assert set(PolicyParams.model_fields) == own
    # Each knob keeps its policy's constraints.
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ServingParams.model_validate({"policy": {"sink_tokens": -1}})


def test_every_policy_is_a_backend_and_its_lossy_flag_sets_the_quality_default() -> None:
    from backends.kvcache.policies import POLICIES
    from workloads.serving.systems import SYSTEMS

    assert set(POLICIES) | {"vllm"} == set(SYSTEMS)
    for name, policy in POLICIES.items():
        assert ServingParams.model_validate({"model": "smollm2-135m", "backend": name, "weights": "real"}).quality_enabled() == policy.lossy
    assert {name for name, policy in POLICIES.items() if policy.lossy} == {"h2o", "infinigen", "streaming"}


def test_an_infinite_request_rate_is_spelled_inf_and_survives_strict_expansion(tmp_path) -> None:
    """'inf' (the documented spelling) expands to an infinite rate; its trial id is stable."""
    import math

    from orchestrator.expand import expand, validate_params
    from orchestrator.spec import load_spec
    from workloads.registry import resolve_kind

    grid = tmp_path / "inf.yaml"
    grid.write_text("experiment: inf\nkind: serving\nbase: {model: smollm2-135m}\n"
                    "grid: {load.request_rate: [inf, 2]}\n")
    kind = resolve_kind("serving")
    first, second = expand(load_spec(grid), kind), expand(load_spec(grid), kind)
    rates = sorted(validate_params(kind, t.params).load.request_rate for t in first)
    assert rates == [2.0, math.inf]
    assert [t.trial_id for t in first] == [t.trial_id for t in second]
