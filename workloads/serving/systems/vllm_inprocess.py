"""The real vLLM in the trial's own process: ``AsyncLLM``, driven without HTTP.

Chosen when vLLM imports in the trial's environment (``transport: inprocess``, or ``auto``).
Same engine settings as the ``vllm serve`` path, same model folders, same request records;
engine rows come per iteration from vLLM's stats.
"""

from __future__ import annotations

from workloads.serving.params import ServingParams
from workloads.serving.systems.vllm_base import VLLMModelSystem
from workloads.serving.transports.base import Transport
from workloads.serving.transports.vllm_inprocess import VLLMEngineTransport


class VLLMEngineSystem(VLLMModelSystem):
    """vLLM's async engine for one engine configuration, in this process."""

    default_transport = "inprocess"

    def __init__(self, params: ServingParams):
        super().__init__(params)
        from backends.kvcache.vllm.async_engine import AsyncEngineHost  # imports vLLM itself

        self.host = AsyncEngineHost(self.config, self.kv_bytes_per_token)

    def transport(self, kind: str) -> Transport:
        """In process only: the engine is right here."""
        if kind != "inprocess":
            raise ValueError(f"vLLM runs in this process: use transport 'inprocess' (got {kind!r}); "
                             "transport 'http' starts `vllm serve` instead")
        return VLLMEngineTransport(self.host)

    def block_size(self) -> int:
        """Tokens per KV block vLLM allocated."""
        return self.host.recorder.block_size

    def close(self) -> None:
        """Shut vLLM's engine and its processes down (idempotent)."""
        self.host.close()
