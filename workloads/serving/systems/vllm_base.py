"""What both ways of running the real vLLM share: the model folder, the engine settings, the tokenizer.

vLLM runs either as a ``vllm serve`` subprocess measured over HTTP (``vllm_server.py``) or as
``AsyncLLM`` inside the trial's process (``vllm_inprocess.py``); ``vllm.py`` picks one. Both run
one engine configuration, built here from the trial's ``engine.*`` and ``backend.*`` parameters.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from backends.kvcache.vllm.model_folder import ModelFolder, prepare_model_folder
from backends.kvcache.vllm.server import CPU_BLOCK_MULTIPLE, DEFAULT_PYTHON, VLLMServerConfig
from workloads.serving.params import ServingParams

SERVED_NAME = "orch-vllm"
# A grid that sizes the cache in blocks but leaves the block size to vLLM gets this size, so the
# count means what it says (vLLM's CPU kernels need a multiple of 32).
BLOCK_SIZE_FOR_COUNTS = {"cpu": CPU_BLOCK_MULTIPLE, "cuda": 16}
# The default KV budget rounds each sequence up to this many tokens: a multiple of any block size
# vLLM picks by itself, so ``max_num_seqs`` full sequences always fit.
ROUNDING_TOKENS = 256


def vllm_importable() -> bool:
    """Whether vLLM imports in this (the trial's) environment."""
    return importlib.util.find_spec("vllm") is not None


def cache_bytes_per_token(params: ServingParams, folder: ModelFolder) -> int:
    """K and V bytes of one token in vLLM's cache: the model's dtype, or ``--kv-cache-dtype``'s."""
    return folder.cache_bytes_per_token(params.backend.kv_cache_dtype())


def default_kv_cache_bytes(params: ServingParams, folder: ModelFolder, block_size: int) -> int:
    """Room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, as our engine sizes it."""
    max_len = params.engine.max_model_len or folder.hf_config.get("max_position_embeddings", 2048)
    blocks = params.engine.max_num_seqs * -(-max_len // block_size)
    return blocks * block_size * cache_bytes_per_token(params, folder)


def server_config(params: ServingParams, folder: ModelFolder) -> VLLMServerConfig:
    """vLLM's engine settings from the trial's ``engine.*`` and ``backend.*`` parameters."""
    engine = params.engine
    kv_bytes = engine.kv_cache_bytes
    block_size = engine.block_size  # None: vLLM's own default for the device
    if engine.kv_cache_blocks is not None:
        block_size = block_size or BLOCK_SIZE_FOR_COUNTS[params.device]
        kv_bytes = engine.kv_cache_blocks * block_size * cache_bytes_per_token(params, folder)
    if kv_bytes is None and engine.gpu_memory_utilization is None and params.device == "cpu":
        # vLLM's CPU default reserves a fraction of *all* host memory; size it like our engine instead.
        kv_bytes = default_kv_cache_bytes(params, folder, block_size or ROUNDING_TOKENS)
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
        block_size=block_size,
        kv_cache_bytes=kv_bytes,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        # vLLM's own default on a GPU is CUDA graphs; on CPU eager skips minutes of compile warm-up.
        enforce_eager=not engine.cuda_graphs if engine.cuda_graphs is not None else params.device == "cpu",
        seed=params.seed,
        startup_timeout_s=params.backend.startup_timeout_s,
        extra_args=tuple(params.backend.extra_args),
    )


class VLLMModelSystem:
    """Base of both vLLM systems: the model folder vLLM loads, its settings and its tokenizer."""

    name = "vllm"

    def __init__(self, params: ServingParams):
        self.params = params
        self.folder = prepare_model_folder(params.model, params.weights, params.dtype)
        self.vocab_size = int(self.folder.hf_config["vocab_size"])
        self.kv_bytes_per_token = cache_bytes_per_token(params, self.folder)
        self.config = server_config(params, self.folder)  # invalid settings raise before anything starts
        self._tokenizer = self._load_tokenizer() if params.weights == "real" else None

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder.path))

    def tokenizer(self) -> Any | None:
        """The model's tokenizer with real weights; None for dummy weights (synthetic prompts)."""
        return self._tokenizer
