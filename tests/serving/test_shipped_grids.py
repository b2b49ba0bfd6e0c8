"""Every shipped grid expands, and every serving trial's backend configuration is one its engine accepts.

No GPU and no model run: our engine's ``EngineConfig`` and policy knobs are built and checked;
vLLM's settings are built (``server_config``) and, where ``.venv-vllm`` exists, its flags are
parsed by vLLM's own engine-argument parser. Omitted engine knobs take the backend's own
default on its device and never make a trial fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from backends.kvcache.policies import POLICIES
from backends.kvcache.vllm.model_folder import ModelFolder, complete_hf_config
from backends.kvcache.vllm.server import engine_flags
from orchestrator.expand import expand
from orchestrator.spec import load_spec
from tests.conftest import REPO
from workloads.registry import resolve_kind
from workloads.serving.params import ServingParams
from workloads.serving.systems.engine import engine_config
from workloads.serving.systems.vllm_base import server_config

GRIDS = sorted((REPO / "grids").glob("*.yaml"))
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

# vLLM's own parser, run in the vLLM environment: one JSON line of its engine arguments per flag list.
PARSE_WITH_VLLM = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
for model, flags in json.load(sys.stdin):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model, *flags]))
    print(json.dumps({"block_size": args.block_size, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                      "gpu_memory_utilization": args.gpu_memory_utilization}))
"""


def model_folder(params: ServingParams) -> ModelFolder:
    """What vLLM would load, without writing or converting anything (shape and dtype suffice here)."""
    from backends.kvcache.config import EngineConfig
    from backends.kvcache.loader import resolve

    # With weights "dummy" a preset resolves to its shape: nothing is converted.
    hf, _ = resolve(EngineConfig(model=params.model, weights="dummy", dtype=params.dtype))
    load_format = "auto" if params.weights == "real" else "dummy"
    return ModelFolder(Path(f"/nonexistent/{params.model}"), load_format, complete_hf_config(hf, params.dtype))


def backend_config(params: ServingParams) -> tuple[str, object]:
    """("engine", EngineConfig with checked policy knobs) or ("vllm", VLLMServerConfig)."""
    if params.backend.name == "vllm":
        return "vllm", server_config(params, model_folder(params))
    config = engine_config(params)
    POLICIES[config.policy].params_model.resolve(config.policy, config.policy_params)
    return "engine", config


def serving_trials(grid: Path) -> list[ServingParams]:
    """The validated parameters of every trial of a serving grid."""
    spec = load_spec(grid)
    kind = resolve_kind(spec.kind)
    return [ServingParams.model_validate(t.params) for t in expand(spec, kind, str(grid))]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_shipped_grid_expands_and_each_backend_config_is_valid(grid: Path) -> None:
    spec = load_spec(grid)
    trials = expand(spec, resolve_kind(spec.kind), str(grid))
    assert trials
    if spec.kind != "serving":
        return
    built = [backend_config(ServingParams.model_validate(t.params)) for t in trials]
    assert {kind for kind, _ in built} <= {"engine", "vllm"}


@pytest.mark.parametrize("grid", [g for g in GRIDS if load_spec(g).kind == "serving"], ids=lambda p: p.name)
def test_shipped_serving_grid_measures_every_backend_through_one_transport(grid: Path) -> None:
    # latencies compare only on the same clock (docs/metrics.md, "Transport")
    transports = {params.transport for params in serving_trials(grid)}
    assert len(transports) == 1 and "auto" not in transports, transports


def test_vllm_and_our_engine_on_cpu_with_no_block_size_take_their_own_defaults() -> None:
    raw = {"model": "tiny-llama", "device": "cpu", "engine": {"max_num_seqs": 4, "max_model_len": 256}}
    full = ServingParams.model_validate({**raw, "backend": "full"})
    vllm = ServingParams.model_validate({**raw, "backend": "vllm", "transport": "http"})
    assert engine_config(full).block_size == 16
    config = server_config(vllm, model_folder(vllm))  # used to fail: "multiple of 32; got 16"
    assert config.block_size is None and "--block-size" not in engine_flags(config)
    # The default budget holds max_num_seqs sequences whatever block size vLLM picks (<= 256).
    assert config.kv_cache_bytes == 4 * 256 * model_folder(vllm).kv_bytes_per_token
    # A budget in blocks with no block size means blocks of vLLM's CPU multiple.
    blocks = ServingParams.model_validate({**raw, "backend": "vllm", "engine": {"kv_cache_blocks": 10}})
    assert server_config(blocks, model_folder(blocks)).block_size == 32
    # A block size the user wrote is still checked.
    explicit = ServingParams.model_validate({**raw, "backend": "vllm", "engine": {"block_size": 16}})
    with pytest.raises(ValueError, match="multiple of 32"):
        server_config(explicit, model_folder(explicit))



@pytest.mark.parametrize("flag", [["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype=fp8_e5m2"]])
def test_a_vllm_cache_in_blocks_is_sized_and_reported_at_the_kv_cache_dtype_it_stores(flag: list[str]) -> None:
    raw = {"model": "tiny-llama", "device": "cpu", "dtype": "bfloat16",
           "engine": {"max_num_seqs": 4, "max_model_len": 256, "kv_cache_blocks": 10}}
    model = ServingParams.model_validate({**raw, "backend": "vllm"})
    fp8 = ServingParams.model_validate({**raw, "backend": {"name": "vllm", "extra_args": ["--seed", "1", *flag]}})
    per_token = model_folder(model).kv_bytes_per_token  # bf16: 2 bytes an element
    assert server_config(model, model_folder(model)).kv_cache_bytes == 10 * 32 * per_token
    # vLLM would have filled fp8 bytes with twice the blocks asked for, reported at twice their size
    assert server_config(fp8, model_folder(fp8)).kv_cache_bytes == 10 * 32 * per_token // 2
    assert fp8.backend.kv_cache_dtype() in {"fp8", "fp8_e5m2"} and model.backend.kv_cache_dtype() == "auto"


def test_a_kv_cache_dtype_orch_cannot_size_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"--kv-cache-dtype 'nvfp4' is not one orch can size \(allowed: auto, "):
        ServingParams.model_validate({"model": "tiny-llama", "backend": {
            "name": "vllm", "extra_args": ["--kv-cache-dtype", "nvfp4"]}})


def test_cuda_graphs_are_the_default_on_a_gpu_and_eager_on_cpu_for_both_engines() -> None:
    raw = {"model": "tiny-llama", "engine": {"max_num_seqs": 4, "max_model_len": 256}}

    def vllm_flags(device: str, **engine: object) -> list[str]:
        params = ServingParams.model_validate(
            {**raw, "device": device, "backend": "vllm", "engine": {**raw["engine"], **engine}})
        return engine_flags(server_config(params, model_folder(params)))

    assert "--enforce-eager" not in vllm_flags("cuda")  # vLLM's own default on a GPU
    assert "--enforce-eager" in vllm_flags("cpu")
    assert "--enforce-eager" in vllm_flags("cuda", cuda_graphs=False)
    full = ServingParams.model_validate({**raw, "device": "cuda", "backend": "full"})
    assert engine_config(full).cuda_graphs is True
    eager = ServingParams.model_validate({**raw, "device": "cuda", "backend": "full",
                                          "engine": {**raw["engine"], "cuda_graphs": False}})
    assert engine_config(eager).cuda_graphs is False
    assert engine_config(full).async_scheduling is None  # the engine decides: on for a GPU
    sync = ServingParams.model_validate({**raw, "device": "cuda", "backend": "full",
                                         "engine": {**raw["engine"], "async_scheduling": False}})
    assert engine_config(sync).async_scheduling is False

@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="needs .venv-vllm (make vllm-env)")
def test_vllm_parses_the_engine_flags_of_every_shipped_vllm_trial() -> None:
    jobs, expected = [], []
    for grid in GRIDS:
        if load_spec(grid).kind != "serving":
            continue
        for params in serving_trials(grid):
            if params.backend.name == "vllm":
                config = server_config(params, model_folder(params))
                jobs.append([config.model_path, engine_flags(config)])
                expected.append(config)
    silent = ServingParams.model_validate({"model": "tiny-llama", "backend": "vllm", "transport": "http"})
    config = server_config(silent, model_folder(silent))
    jobs.append([config.model_path, engine_flags(config)])
    expected.append(config)
    run = subprocess.run([str(VLLM_PYTHON), "-c", PARSE_WITH_VLLM], input=json.dumps(jobs),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    parsed = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(parsed) == len(expected)
    for args, config in zip(parsed, expected, strict=True):
        assert args["block_size"] == config.block_size  # None: vLLM picks its default
        assert args["kv_cache_memory_bytes"] == config.kv_cache_bytes
        if config.gpu_memory_utilization is not None:
            assert args["gpu_memory_utilization"] == config.gpu_memory_utilization
