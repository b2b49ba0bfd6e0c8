"""The real vLLM as a system under test, in one of two ways (``open_vllm_system`` picks):

- in process (``transport: inprocess``): vLLM's ``AsyncLLM`` inside the trial's process, when
  ``vllm`` imports in the trial's environment (``vllm_engine_system.py``);
- as a server (``transport: http``): ``vllm serve`` started as a subprocess from
  ``backend.python`` (default: the trial's own Python when it has vLLM, else
  ``.venv-vllm/bin/python``, built by ``make vllm-env``), measured through the same OpenAI
  streaming client as every HTTP backend, with engine-side samples (running, waiting, KV blocks
  in use, preemptions) from vLLM's ``/metrics`` endpoint (this file).

``transport: auto`` (the default) is in process when vLLM imports here, else the server.
"""

from __future__ import annotations

import importlib.util
import sys
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
    python = params.backend.python or (sys.executable if vllm_importable() else DEFAULT_PYTHON)
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


def vllm_importable() -> bool:
    """Whether vLLM imports in this (the trial's) environment."""
    return importlib.util.find_spec("vllm") is not None


class VLLMSystem:
    """A running ``vllm serve`` for one engine configuration."""

    name = "vllm"
    default_transport = "http"

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
        """HTTP only: this vLLM is a ``vllm serve`` process."""
        if kind != "http":
            raise ValueError(f"this vLLM runs as a server (vllm serve): use transport 'http' (got {kind!r})")
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


def open_vllm_system(params: ServingParams) -> Any:
    """Factory registered as ``vllm`` in ``workloads.serving.systems.SYSTEMS``: in process or a server."""
    in_process = params.transport == "inprocess" or (params.transport == "auto" and vllm_importable())
    if not in_process:
        return VLLMSystem(params)
    if not vllm_importable():
        raise ValueError(
            f"backend 'vllm' with transport 'inprocess' needs vLLM importable by the trial's Python "
            f"({sys.executable}); run orch from an environment that has vLLM (e.g. .venv-vllm/bin/orch), "
            "or use transport 'http' (vllm serve from backend.python)"
        )
    from workloads.serving.vllm_engine_system import VLLMEngineSystem

    return VLLMEngineSystem(params)
