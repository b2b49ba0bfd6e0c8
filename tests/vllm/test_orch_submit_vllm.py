"""A serving grid with our engine and the real vLLM, run by `orch submit` end to end.

The path a user takes: relative `backend.python` resolved by the orchestrator, trial actors that
start and stop `vllm serve`, results in Parquet and the manifest, and `orch report`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.vllm.shapes import TINY_SHAPE

pytestmark = pytest.mark.slow


def test_orch_submit_compares_our_engine_and_vllm(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama32"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_SHAPE))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "experiment": "engine-vs-vllm",
        "kind": "serving",
        "base": {
            "model": str(model),
            "backend": {"python": ".venv-vllm/bin/python", "startup_timeout_s": 300},  # relative to the repo
            # No block size: each backend takes its own default on the CPU (vLLM's needs multiples of 32).
            "engine": {"max_num_seqs": 8, "max_model_len": 256, "kv_cache_bytes": 16 << 20},
            "load": {"num_requests": 8, "request_rate": 8.0, "input_len": 32, "output_len": 8, "seed": 1},
        },
        "zip": {"backend.name": ["full", "vllm"], "transport": ["inprocess", "http"]},
        "resources": {"num_cpus": 1},
        "retries": 0,
        "timeout_s": 600,
    }))
    results = tmp_path / "results"
    submit = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(grid), "--results", str(results), "--no-dashboard"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    store = ExperimentStore(results, "engine-vs-vllm")
    manifest = store.load_manifest()
    assert sorted(e["state"] for e in manifest["trials"].values()) == ["done", "done"]
    summary = store.read_table("serving_summary").to_pandas().set_index("backend")
    for backend in ("full", "vllm"):
        assert summary.loc[backend, "completed"] == 8 and summary.loc[backend, "failed"] == 0
        assert summary.loc[backend, "total_output_tokens"] == 64
        assert summary.loc[backend, "ttft_ms_median"] > 0
    assert summary.loc["vllm", "transport"] == "http"
    # The block size each engine used is recorded: ours 16, vLLM's own CPU default.
    assert summary.loc["full", "block_size"] == 16
    assert summary.loc["vllm", "block_size"] > 0 and summary.loc["vllm", "block_size"] % 32 == 0
    report = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", "engine-vs-vllm", "--results", str(results)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "vllm" in report.stdout and "full" in report.stdout
