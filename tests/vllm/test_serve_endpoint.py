"""Our engine behind Ray Serve: OpenAI-compatible routes, and the ``vllm bench serve`` cross-check."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from backends.kvcache.config import EngineConfig
from backends.kvcache.vllm.model_folder import dummy_folder
from backends.network.ports import free_port
from tests.vllm.bench_client import BenchLoad, VLLMBench
from tests.vllm.crosscheck import assert_client_agrees_with_vllm_bench
from tests.vllm.shapes import TINY_SHAPE

pytestmark = pytest.mark.slow

APP = "orch-test"
# A rate at which the server is idle when most requests arrive: TTFT is then service time, not the
# luck of landing behind another request (docs/metrics.md, cross-check).
LOAD = BenchLoad(num_prompts=32, input_len=64, output_len=16, request_rate=2.0, seed=0)


@pytest.fixture(scope="module")
def endpoint(model_dir: Path):
    import ray
    from ray import serve

    from backends.kvcache.serve import deploy

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        config = EngineConfig(model=str(model_dir), block_size=32, max_num_seqs=16, max_model_len=512)
        url = deploy(config, port=free_port(), name=APP, torch_threads=1)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_health_models_and_metrics(endpoint: str) -> None:
    assert endpoint.startswith("http://127.0.0.1:")
    assert httpx.get(f"{endpoint}/health").status_code == 200
    (model,) = httpx.get(f"{endpoint}/v1/models").json()["data"]
    assert model["id"] == APP and model["max_model_len"] == 512
    metrics = httpx.get(f"{endpoint}/metrics").text
    assert 'vllm:num_requests_running{engine="0",model_name="orch-test"} 0.0' in metrics
    assert 'block_size="32"' in metrics and "orch:kv_bytes_host" in metrics


def test_completion_with_text_or_ids_and_errors(endpoint: str) -> None:
    by_ids = httpx.post(f"{endpoint}/v1/completions", json={"model": APP, "prompt": [5, 6, 7], "max_tokens": 4,
                                                             "temperature": 0, "ignore_eos": True}).json()
    (choice,) = by_ids["choices"]
    assert len(choice["token_ids"]) == 4 and choice["finish_reason"] == "length"
    assert by_ids["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    # The synthetic tokenizer maps "t<i>" to id i, so the text prompt is the same prompt.
    by_text = httpx.post(f"{endpoint}/v1/completions", json={"model": APP, "prompt": "t5 t6 t7", "max_tokens": 4,
                                                              "temperature": 0, "ignore_eos": True}).json()
    assert by_text["choices"][0]["token_ids"] == choice["token_ids"]  # greedy: same output
    too_long = httpx.post(f"{endpoint}/v1/completions", json={"model": APP, "prompt": [5] * 500, "max_tokens": 20})
    assert too_long.status_code == 400 and "max_model_len" in too_long.json()["error"]["message"]
    wrong_model = httpx.post(f"{endpoint}/v1/completions", json={"model": "nope", "prompt": [5], "max_tokens": 1})
    assert wrong_model.status_code == 404


def test_stream_matches_the_openai_format(endpoint: str) -> None:
    body = {"model": APP, "prompt": [9, 8, 7], "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{endpoint}/v1/completions", json=body) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 3 and all(len(c["choices"][0]["token_ids"]) == 1 for c in token_chunks)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_vllm_bench_serve_agrees_with_our_client_on_our_endpoint(endpoint: str, vllm_bench: VLLMBench,
                                                                  tmp_path: Path) -> None:
    tokenizer = dummy_folder(TINY_SHAPE, "float32").path
    assert_client_agrees_with_vllm_bench(vllm_bench, endpoint, APP, str(tokenizer), LOAD, TINY_SHAPE["vocab_size"], tmp_path)
