"""`orch serve`: a study's configuration put into service behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from backends.network.ports import free_port
from tests.conftest import REPO
from tests.support.procs import stop_group

pytestmark = pytest.mark.slow


def test_orch_serve_streams_completions_for_a_trial_of_a_grid(tiny_model: str, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "experiment": "serve-me", "kind": "serving",
        "base": {"model": tiny_model, "engine": {"max_num_seqs": 4, "max_model_len": 128}, "policy": {"kv_budget": 0.5}},
        "grid": {"backend": ["full", "h2o"]},
    }))
    listing = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(grid)], cwd=REPO,
                             capture_output=True, text=True, check=True)
    h2o_id = next(line.split()[1] for line in listing.stdout.splitlines() if "h2o" in line and "│" in line)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", str(grid), h2o_id, "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("orch serve did not come up")
        body = {"model": "orch", "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        chunks = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage[-1]["completion_tokens"] == 7 and usage[-1]["prompt_tokens"] == 5
        assert sum(1 for c in chunks if c.get("choices")) >= 7
    finally:
        stop_group(proc, signal.SIGINT, grace_s=60)


def test_orch_serve_names_unknown_trials(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"experiment": "e", "kind": "serving", "grid": {"backend": ["full"]}}))
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", str(grid), "nope-0"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no trial 'nope-0' in") and "Traceback" not in result.stderr
