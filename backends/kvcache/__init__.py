"""Our serving engine: continuous batching over a block-budgeted KV cache with pluggable policies."""

from backends.kvcache.config import EngineConfig, ModelConfig
from backends.kvcache.engine import EngineStats, LLMEngine, StepOutput
from backends.kvcache.policies import POLICIES
from backends.kvcache.presets import PRESETS

__all__ = ["POLICIES", "PRESETS", "EngineConfig", "EngineStats", "LLMEngine", "ModelConfig", "StepOutput"]
