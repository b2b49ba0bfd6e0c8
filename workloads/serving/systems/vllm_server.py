"""The real vLLM as a server: ``vllm serve`` started as a subprocess from ``backend.python``.

``backend.python`` defaults to the trial's own Python when it has vLLM, else
``.venv-vllm/bin/python`` (built by ``make vllm-env``). Measured through the same OpenAI
streaming client as every HTTP backend, with engine-side samples (running, waiting, KV blocks
in use, preemptions) from vLLM's ``/metrics`` endpoint.
"""

from __future__ import annotations

import httpx

from backends.kvcache.vllm.server import VLLMServer
from workloads.serving.params import ServingParams
from workloads.serving.systems.vllm_base import SERVED_NAME, VLLMModelSystem
from workloads.serving.transports.base import Transport
from workloads.serving.transports.http import HttpTarget, HttpTransport
from workloads.serving.transports.prometheus import PrometheusStepSampler, cache_shape


class VLLMSystem(VLLMModelSystem):
    """A running ``vllm serve`` for one engine configuration."""

    default_transport = "http"

    def __init__(self, params: ServingParams):
        super().__init__(params)
        self.server = VLLMServer(self.config).start()
        self._sampler = PrometheusStepSampler(f"{self.base_url}/metrics", self.kv_bytes_per_token)
        self._block_size = self.config.block_size
        try:
            shape = cache_shape(self._sampler.scrape())  # vLLM exports the cache it allocated
        except httpx.HTTPError:
            shape = None
        if shape is not None:
            self._block_size = shape.block_size

    @property
    def base_url(self) -> str:
        """Where the server listens (``http://127.0.0.1:PORT``)."""
        return self.server.base_url

    def transport(self, kind: str) -> Transport:
        """HTTP only: this vLLM is a ``vllm serve`` process."""
        if kind != "http":
            raise ValueError(f"this vLLM runs as a server (vllm serve): use transport 'http' (got {kind!r})")
        return HttpTransport(HttpTarget(self.base_url, SERVED_NAME), sampler=self._sampler)

    def block_size(self) -> int | None:
        """Tokens per KV block vLLM allocated (from its ``/metrics``)."""
        return self._block_size

    def close(self) -> None:
        """Stop the server and its processes (idempotent)."""
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        self.server.stop()
