"""Model construction: resolve a name to a shape and weights (HF folder, GGUF via a cached
safetensors conversion, or seeded random ``dummy`` weights) and build the module."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backends.kvcache.config import EngineConfig, ModelConfig
from backends.kvcache.models import MODELS
from backends.kvcache.presets import PRESETS, REAL_WEIGHTS

DUMMY_STD = 0.02


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Any | None  # a transformers tokenizer when the weights are real and one ships with them
    weights_dir: Path | None  # the HF folder the real weights came from


def cache_root() -> Path:
    """Where converted models live: $ORCH_CACHE, else ~/.cache/orch."""
    return Path(os.environ.get("ORCH_CACHE") or Path.home() / ".cache" / "orch")


def packaged_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed Python package (no import needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (it ships {filename}); run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ValueError(f"{path} not found inside package {package!r}")
    return path


def gguf_to_hf_folder(gguf_path: Path, name: str | None = None) -> Path:
    """Convert a GGUF file once into a cached HF folder (safetensors + config + tokenizer)."""
    target = cache_root() / "models" / (name or gguf_path.stem)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel processes convert once
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        from safetensors.torch import save_file

        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantized now
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = hf_model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve(config: EngineConfig) -> tuple[dict[str, Any], Path | None]:
    """(HF config dict, folder with real weights or None) for the engine's ``model``."""
    name = config.model
    if name in PRESETS:
        if config.weights == "dummy":
            return PRESETS[name], None
        if name not in REAL_WEIGHTS:
            raise ValueError(f"preset {name!r} has no offline weights; use weights: dummy (real: {sorted(REAL_WEIGHTS)})")
        folder = gguf_to_hf_folder(packaged_file(*REAL_WEIGHTS[name]), name)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            folder = gguf_to_hf_folder(path)
        elif (path / "config.json").is_file():
            folder = path
        else:
            raise ValueError(
                f"model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}), "
                "a folder with config.json, nor a .gguf file"
            )
    hf = json.loads((folder / "config.json").read_text())
    return hf, (folder if config.weights == "real" else None)


def _init_dummy(model: nn.Module, seed: int, device: torch.device) -> None:
    """Seeded N(0, 0.02) matrices, unit norm scales, zero biases."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            p.data.normal_(0.0, DUMMY_STD, generator=gen)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def load_model(config: EngineConfig) -> LoadedModel:
    """Build the model of ``config`` on its device and dtype, with real or dummy weights."""
    hf, folder = resolve(config)
    dtype = config.torch_dtype
    cfg = ModelConfig.from_hf(hf, dtype_bytes=torch.empty((), dtype=dtype).element_size())
    device = torch.device(config.device)
    with torch.device("meta"):
        model = MODELS[cfg.arch](cfg)
    model = model.to(dtype)
    if device.type != "meta":
        model = model.to_empty(device=device)
    model.post_materialize()
    if device.type != "meta":
        if folder is None:
            _init_dummy(model, config.seed, device)
        else:
            sd = {k: v.to(dtype) for k, v in _read_state_dict(folder).items()}
            model.load_hf_state_dict(sd)
    model.eval().requires_grad_(False)
    tokenizer = None
    if folder is not None and any(folder.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, weights_dir=folder)
