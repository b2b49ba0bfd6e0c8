"""Our engine (backends/kvcache) as a system under test, one cache policy per backend name.

``transport: inprocess`` (default) drives an ``LLMEngine`` in the trial's own process;
``transport: http`` serves the same engine configuration as a Ray Serve application with an
OpenAI-compatible streaming endpoint (backends/kvcache/serve.py) and measures it through the
HTTP client that measures vLLM.
"""

from __future__ import annotations

import gc
import uuid
from typing import Any

import httpx

from backends.kvcache.policies import POLICIES
from backends.network.ports import free_port
from workloads.serving.params import ServingParams
from workloads.serving.systems.registry import SYSTEMS
from workloads.serving.transports.base import Transport
from workloads.serving.transports.engine_inprocess import InProcessTransport
from workloads.serving.transports.http import HttpTarget, HttpTransport
from workloads.serving.transports.prometheus import PrometheusStepSampler


def engine_config(params: ServingParams, policy: str | None = None) -> Any:
    """The ``EngineConfig`` a trial's parameters describe (``policy`` overrides the backend's)."""
    from backends.kvcache.config import EngineConfig

    policy = policy or params.backend.name
    return EngineConfig(
        model=params.model,
        weights=params.weights,
        dtype=params.dtype,
        device=params.device,
        policy=policy,
        # The full-cache reference of a quality measurement keeps every token.
        policy_params=params.policy_knobs(policy) if policy == params.backend.name else {},
        kv_cache_bytes=params.engine.kv_cache_bytes,
        kv_cache_blocks=params.engine.kv_cache_blocks,
        **({"block_size": params.engine.block_size} if params.engine.block_size is not None else {}),
        **({"cuda_graphs": params.engine.cuda_graphs} if params.engine.cuda_graphs is not None else {}),
        async_scheduling=params.engine.async_scheduling,
        max_num_seqs=params.engine.max_num_seqs,
        max_model_len=params.engine.max_model_len,
        seed=params.seed,
    )


def build_engine(params: ServingParams, policy: str | None = None) -> Any:
    """A loaded ``LLMEngine`` for the trial's model and the given (default: its own) policy."""
    from backends.kvcache.engine import LLMEngine

    return LLMEngine(engine_config(params, policy))


class EngineSystem:
    """One ``LLMEngine`` served in process."""

    default_transport = "inprocess"

    def __init__(self, params: ServingParams, engine: Any | None = None):
        self.name = params.backend.name
        self.params = params
        self.engine = engine if engine is not None else build_engine(params)
        self.vocab_size = int(self.engine.model_config.vocab_size)

    def transport(self, kind: str) -> Transport:
        """In process only: HTTP for our engine goes through the Ray Serve deployment."""
        if kind == "inprocess":
            return InProcessTransport(self.engine)
        raise ValueError(f"backend {self.name!r} supports transport 'inprocess' here; got {kind!r}")

    def tokenizer(self) -> Any | None:
        """The engine's tokenizer (real weights), else None."""
        return getattr(self.engine, "tokenizer", None)

    def block_size(self) -> int:
        """Tokens per KV block of the engine."""
        return int(self.engine.config.block_size)

    def warm_up(self) -> None:
        """One tiny generation so the first measured step does not pay one-time set-up costs."""
        self.engine.generate([[1, 2, 3, 4]], max_tokens=2)
        self.engine.reset_peaks()

    def reset_peaks(self) -> None:
        """Start a new peak-measurement window."""
        self.engine.reset_peaks()

    def memory_peaks(self) -> dict[str, int]:
        """Peak device KV bytes and peak device bytes since the last reset."""
        return {
            "peak_kv_bytes": int(self.engine.peak_kv_bytes()),
            "peak_device_bytes": int(self.engine.peak_device_bytes()),
        }

    def close(self) -> None:
        """Drop the engine (idempotent)."""
        self.engine = None
        gc.collect()


def replica_placement(device: str) -> dict[str, Any]:
    """Ray options that put a served engine's replica on the trial's own accelerator: the trial's
    placement group already holds the GPU, so the replica asks for none, runs on this node and
    sees the devices the trial was given. Nothing on CPU."""
    import os

    import ray

    if not device.startswith("cuda") or not ray.is_initialized():
        return {}
    return {"resources": {f"node:{ray.util.get_node_ip_address()}": 0.001},
            "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}}}


class ServedEngineSystem:
    """One ``LLMEngine`` behind Ray Serve's OpenAI-compatible ``/v1/completions`` (HTTP only)."""

    default_transport = "http"

    def __init__(self, params: ServingParams):
        from backends.kvcache.config import ModelConfig
        from backends.kvcache.loader import resolve
        from backends.kvcache.serve import deploy

        self.name = params.backend.name
        self.params = params
        config = engine_config(params)
        hf, folder = resolve(config)
        self.vocab_size = int(hf["vocab_size"])
        self._tokenizer = None
        if folder is not None and any(folder.glob("tokenizer*")):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        kv_bytes_per_token = ModelConfig.from_hf(hf, config.torch_dtype.itemsize).kv_bytes_per_token
        self._block_size = int(config.block_size)
        self.app_name = f"orch-{self.name}-{uuid.uuid4().hex[:8]}"
        # its own route: the trials of a grid share the cluster's one Serve proxy
        self.base_url = deploy(config, port=free_port(), name=self.app_name, route_prefix=f"/{self.app_name}",
                               actor_options=replica_placement(config.device))
        self._sampler = PrometheusStepSampler(f"{self.base_url}/metrics", kv_bytes_per_token)

    def transport(self, kind: str) -> Transport:
        """HTTP only: the engine runs in a Serve replica."""
        if kind != "http":
            raise ValueError(f"this system serves backend {self.name!r} over HTTP; got transport {kind!r}")
        return HttpTransport(HttpTarget(self.base_url, self.app_name), sampler=self._sampler)

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (real weights), else None."""
        return self._tokenizer

    def block_size(self) -> int:
        """Tokens per KV block of the served engine."""
        return self._block_size

    def reset_peaks(self) -> None:
        """Start a new peak-measurement window in the served engine."""
        httpx.post(f"{self.base_url}/v1/engine_peaks/reset", timeout=30, trust_env=False).raise_for_status()

    def memory_peaks(self) -> dict[str, int]:
        """The served engine's own peak K/V and device bytes since the last reset."""
        response = httpx.get(f"{self.base_url}/v1/engine_peaks", timeout=30, trust_env=False)
        response.raise_for_status()
        return {key: int(value) for key, value in response.json().items()}

    def close(self) -> None:
        """Stop sampling and delete the Serve application (idempotent)."""
        from backends.kvcache.serve import undeploy

        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
            undeploy(self.app_name)


def open_engine_system(params: ServingParams) -> EngineSystem | ServedEngineSystem:
    """Our engine with the cache policy the backend names: in process, or behind Ray Serve (http)."""
    if params.transport == "http":
        return ServedEngineSystem(params)
    system = EngineSystem(params)
    system.warm_up()
    return system


# One backend per registered cache policy: a new policy is a new backend with no edit here.
for _policy in POLICIES:
    SYSTEMS.register(open_engine_system, name=_policy)
