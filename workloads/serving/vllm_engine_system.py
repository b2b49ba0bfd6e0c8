"""The real vLLM in the trial's own process: ``AsyncLLM``, driven without HTTP.

Chosen by ``open_vllm_system`` when vLLM imports in the trial's environment (``transport:
inprocess``, or ``auto``). Same engine settings as the ``vllm serve`` path (``server_config``),
same model folders, same request records; engine rows come per iteration from vLLM's stats.
"""

from __future__ import annotations

from typing import Any

from backends.kvcache.vllm.async_engine import AsyncEngineHost, AsyncEngineTransport
from backends.kvcache.vllm.model_folder import prepare_model_folder
from workloads.serving.params import ServingParams
from workloads.serving.transport import Transport
from workloads.serving.vllm_system import server_config


class VLLMEngineSystem:
    """vLLM's async engine for one engine configuration, in this process."""

    name = "vllm"
    default_transport = "inprocess"

    def __init__(self, params: ServingParams):
        self.params = params
        self.folder = prepare_model_folder(params.model, params.weights, params.dtype)
        self.vocab_size = int(self.folder.hf_config["vocab_size"])
        config = server_config(params, self.folder)  # invalid settings raise before anything starts
        self._tokenizer = self._load_tokenizer() if params.weights == "real" else None
        self.host = AsyncEngineHost(config, self.folder.kv_bytes_per_token)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder.path))

    def transport(self, kind: str) -> Transport:
        """In process only: the engine is right here."""
        if kind != "inprocess":
            raise ValueError(f"vLLM runs in this process: use transport 'inprocess' (got {kind!r}); "
                             "transport 'http' starts `vllm serve` instead")
        return AsyncEngineTransport(self.host)

    def tokenizer(self) -> Any | None:
        """The model's tokenizer with real weights; None for dummy weights (synthetic prompts)."""
        return self._tokenizer

    def close(self) -> None:
        """Shut vLLM's engine and its processes down (idempotent)."""
        self.host.close()
