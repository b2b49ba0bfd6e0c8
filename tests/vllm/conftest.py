"""Fixtures for the vLLM tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vllm.bench_client import VLLMBench
from tests.vllm.shapes import TINY_SHAPE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config-only model folder of ``TINY_SHAPE`` (dummy weights), one per test module."""
    folder = tmp_path_factory.mktemp("tiny-llama32")
    (folder / "config.json").write_text(json.dumps(TINY_SHAPE))
    return folder


@pytest.fixture(scope="session")
def vllm_bench():
    """``vllm bench serve``'s process, shared by every cross-check: importing vLLM (~18 s here) is paid once."""
    with VLLMBench() as bench:
        yield bench
