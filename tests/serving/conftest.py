"""Fixtures for serving tests: a tiny model shape (dummy weights) and a trial context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.kvcache.presets import PRESETS
from workloads.kind import TrialContext

# The engine's tiny preset, untied, with a shorter context (a config-only folder for tests).
TINY_LLAMA = {**PRESETS["tiny-llama"], "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine, 2 spinning OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A folder holding only a config.json: the engine builds it with seeded dummy weights."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(folder)


@pytest.fixture
def ctx(tmp_path: Path) -> TrialContext:
    reports: list[dict] = []
    return TrialContext(
        experiment="test-serving", trial_id="t0", repeat=0, attempt=0, workdir=tmp_path,
        resources={"num_cpus": 1.0}, report=lambda record, step=None: reports.append(record),
    )


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), from the packaged GGUF."""
    from transformers import AutoTokenizer

    from backends.kvcache.loader import gguf_to_hf_folder, packaged_file
    from backends.kvcache.presets import REAL_WEIGHTS

    return AutoTokenizer.from_pretrained(str(gguf_to_hf_folder(packaged_file(*REAL_WEIGHTS["smollm2-135m"]),
                                                                 "smollm2-135m")))
