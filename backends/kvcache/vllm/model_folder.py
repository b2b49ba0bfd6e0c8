"""Hugging Face model folders that vLLM can load without the hub.

vLLM needs a folder with ``config.json`` and a tokenizer. For the engine's shape presets (and
any config-only folder) with ``weights: dummy`` we write the config plus a *synthetic* word-level
tokenizer whose vocabulary is exactly the model's (token ``t<i>`` is id ``i``), and vLLM fills
the weights at random (``load_format: dummy``). The synthetic tokenizer makes text and token ids
round-trip exactly (``"t5 t9"`` <-> ``[5, 9]``), so a client that sends text (``vllm bench
serve``) and one that sends token ids see the same prompt lengths, and any generated id
detokenizes. Real SmolLM2 weights come from the engine's GGUF -> safetensors conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelFolder:
    """A folder vLLM loads, and how to load it."""

    path: Path
    load_format: str  # auto (weights in the folder) | dummy (random weights)
    hf_config: dict[str, Any]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes for one token across all layers, at the config's dtype."""
        return kv_bytes_per_token(self.hf_config, self.hf_config.get("torch_dtype", "float32"))

    def cache_bytes_per_token(self, cache_dtype: str) -> int:
        """K and V bytes for one token across all layers as vLLM stores them (``--kv-cache-dtype``;
        ``auto`` is the model's dtype)."""
        if cache_dtype == "auto":
            return self.kv_bytes_per_token
        return kv_bytes_per_token(self.hf_config, cache_dtype)


# Bytes per element of the dtypes a cache is sized in: the model's, and vLLM's ``--kv-cache-dtype``
# values stored one plain element each (its packed formats with scales are not sized here).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
CACHE_DTYPES = ("auto", *(name for name, size in DTYPE_BYTES.items() if size < 4))


def kv_bytes_per_token(hf_config: dict[str, Any], dtype: str) -> int:
    """2 x layers x kv_heads x head_dim x dtype bytes, from a HF config dict."""
    dtype_bytes = DTYPE_BYTES[dtype]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return 2 * hf_config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def complete_hf_config(hf_config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A config.json vLLM accepts: the shape plus architecture and dtype."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} not supported for vLLM; allowed: {sorted(ARCHITECTURES)}")
    config = {"model_type": model_type, **hf_config}
    if not config.get("architectures"):  # absent, or None in a GGUF conversion
        config["architectures"] = [ARCHITECTURES[model_type]]
    config["torch_dtype"] = dtype
    config.setdefault("bos_token_id", 1)
    config.setdefault("eos_token_id", 2)
    if model_type != "opt":
        config.setdefault("hidden_act", "silu")
    return config


def write_synthetic_tokenizer(dest: Path, vocab_size: int, eos_token_id: int, bos_token_id: int) -> None:
    """A word-level tokenizer over ``t0 .. t<vocab-1>`` (BOS/EOS named ``<s>``/``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {i: f"t{i}" for i in range(vocab_size)}
    names[bos_token_id] = "<s>"
    names[eos_token_id] = "</s>"
    vocab = {name: i for i, name in names.items()}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="</s>")
    fast.model_max_length = 1 << 30
    fast.save_pretrained(str(dest))


def _write_folder(dest: Path, config: dict[str, Any], tokenizer_from: Path | None) -> None:
    """Write config.json and a tokenizer into ``dest`` atomically (temp folder + rename)."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_from is not None:
        for item in tokenizer_from.iterdir():
            if item.name.startswith("tokenizer") or item.name in ("vocab.json", "merges.txt",
                                                                  "special_tokens_map.json"):
                (tmp / item.name).write_bytes(item.read_bytes())
    else:
        eos = config["eos_token_id"]
        eos = eos[0] if isinstance(eos, list) else eos
        write_synthetic_tokenizer(tmp, config["vocab_size"], eos_token_id=eos, bos_token_id=config["bos_token_id"])
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def dummy_folder(hf_config: dict[str, Any], dtype: str, tokenizer_from: Path | None = None) -> ModelFolder:
    """A config + tokenizer folder (cached by content) for random weights of this shape."""
    config = complete_hf_config(hf_config, dtype)
    key = hashlib.sha256(json.dumps([config, str(tokenizer_from)], sort_keys=True).encode()).hexdigest()[:16]
    from backends.kvcache.loader import cache_root

    dest = cache_root() / "vllm-models" / f"dummy-{key}"
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_folder(dest, config, tokenizer_from)
    return ModelFolder(path=dest, load_format="dummy", hf_config=config)


def has_tokenizer(folder: Path) -> bool:
    """Whether a HF folder carries tokenizer files."""
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def real_folder(folder: Path, dtype: str) -> ModelFolder:
    """A HF folder with weights and tokenizer; when its config lacks what vLLM needs (a GGUF
    conversion has no ``architectures``), an overlay folder with a completed config.json and
    links to the original files."""
    config = json.loads((folder / "config.json").read_text())
    if not has_tokenizer(folder):
        raise ValueError(f"{folder} has weights but no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if config.get("architectures"):
        return ModelFolder(path=folder, load_format="auto", hf_config={**config, "torch_dtype": dtype})
    from backends.kvcache.loader import cache_root

    completed = complete_hf_config(config, dtype)
    key = hashlib.sha256(json.dumps([str(folder.resolve()), completed], sort_keys=True).encode()).hexdigest()[:16]
    dest = cache_root() / "vllm-models" / f"real-{key}"
    if not (dest / "config.json").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for item in folder.iterdir():
            if item.name != "config.json":
                (tmp / item.name).symlink_to(item.resolve())
        (tmp / "config.json").write_text(json.dumps(completed, indent=2, sort_keys=True))
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return ModelFolder(path=dest, load_format="auto", hf_config=completed)


def prepare_model_folder(model: str, weights: str, dtype: str) -> ModelFolder:
    """The folder vLLM serves for an engine model name (preset, HF folder or .gguf) and weights."""
    from backends.kvcache.config import EngineConfig
    from backends.kvcache.loader import resolve

    hf_config, weights_dir = resolve(EngineConfig(model=model, weights=weights, dtype=dtype))
    if weights_dir is not None:
        return real_folder(weights_dir, dtype)
    given = Path(model).expanduser()
    tokenizer_from = given if given.is_dir() and has_tokenizer(given) else None
    return dummy_folder(hf_config, dtype, tokenizer_from)
