"""The real vLLM as a system under test: ``vllm serve`` from its own environment, driven over HTTP.

The main environment has no vLLM (it pins its own torch), so the server starts as a subprocess
from ``backend.python`` (default ``.venv-vllm/bin/python``, built by ``make vllm-env``) and is
measured through the same OpenAI streaming client as every HTTP backend. Engine-side samples
(running, waiting, KV blocks in use, preemptions) come from vLLM's ``/metrics`` endpoint.
"""

from __future__ import annotations

from typing import Any

from backends.kvcache.vllm.metrics import PrometheusStepSampler
from backends.kvcache.vllm.model_folder import ModelFolder, prepare_model_folder
from backends.kvcache.vllm.server import DEFAULT_PYTHON, VLLMServer, VLLMServerConfig
from workloads.serving.http_transport import HttpTarget, HttpTransport
from workloads.serving.params import ServingParams
from workloads.serving.transport import Transport

SERVED_NAME = "orch-vllm"


def default_kv_cache_bytes(params: ServingParams, folder: ModelFolder, block_size: int) -> int:
    """Room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, as our engine sizes it."""
    max_len = params.engine.max_model_len or folder.hf_config.get("max_position_embeddings", 2048)
    blocks = params.engine.max_num_seqs * -(-max_len // block_size)
    return blocks * block_size * folder.kv_bytes_per_token


def server_config(params: ServingParams, folder: ModelFolder) -> VLLMServerConfig:
    """``vllm serve`` settings from the trial's ``engine.*`` and ``backend.*`` parameters."""
    engine = params.engine
    kv_bytes = engine.kv_cache_bytes
    if engine.kv_cache_blocks is not None:
        kv_bytes = engine.kv_cache_blocks * engine.block_size * folder.kv_bytes_per_token
    if kv_bytes is None and engine.gpu_memory_utilization is None and params.device == "cpu":
        # vLLM's CPU default reserves a fraction of *all* host memory; size it like our engine instead.
        kv_bytes = default_kv_cache_bytes(params, folder, engine.block_size)
    python = params.backend.python or DEFAULT_PYTHON
    return VLLMServerConfig(
        model_path=str(folder.path),
        served_model_name=SERVED_NAME,
        python=python,
        load_format=folder.load_format,
        dtype=params.dtype,
        device=params.device,
        max_num_seqs=engine.max_num_seqs,
        max_model_len=engine.max_model_len,
        block_size=engine.block_size,
        kv_cache_bytes=kv_bytes,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        seed=params.seed,
        startup_timeout_s=params.backend.startup_timeout_s,
        extra_args=tuple(params.backend.extra_args),
    )


class VLLMSystem:
    """A running ``vllm serve`` for one engine configuration."""

    name = "vllm"

    def __init__(self, params: ServingParams):
        self.params = params
        self.folder = prepare_model_folder(params.model, params.weights, params.dtype)
        self.vocab_size = int(self.folder.hf_config["vocab_size"])
        config = server_config(params, self.folder)  # invalid settings raise before anything starts
        self._tokenizer = self._load_tokenizer() if params.weights == "real" else None
        self.server = VLLMServer(config).start()
        self._sampler: PrometheusStepSampler | None = None

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder.path))

    @property
    def base_url(self) -> str:
        """Where the server listens (``http://127.0.0.1:PORT``)."""
        return self.server.base_url

    def transport(self, kind: str) -> Transport:
        """HTTP only: vLLM runs in another environment."""
        if kind != "http":
            raise ValueError(f"backend 'vllm' runs as a server: use transport 'http' (got {kind!r})")
        if self._sampler is None:
            self._sampler = PrometheusStepSampler(
                f"{self.base_url}/metrics", self.folder.kv_bytes_per_token
            )
        return HttpTransport(HttpTarget(self.base_url, SERVED_NAME), sampler=self._sampler)

    def tokenizer(self) -> Any | None:
        """The model's tokenizer with real weights; None for dummy weights (synthetic prompts)."""
        return self._tokenizer

    def close(self) -> None:
        """Stop the server and its processes (idempotent)."""
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        self.server.stop()


def open_vllm_system(params: ServingParams) -> VLLMSystem:
    """Factory registered as ``vllm`` in ``workloads.serving.systems.SYSTEMS``."""
    return VLLMSystem(params)
