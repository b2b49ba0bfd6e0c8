"""vLLM that cannot start fails the trial within the start-up timeout, with vLLM's own last log
lines in the error and its log kept, and leaves no process and no scratch folder behind. The
failing starts run in parallel to save time."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.kvcache.vllm.model_folder import dummy_folder
from backends.kvcache.vllm.server import VLLMServer, VLLMServerConfig, VLLMStartupError
from tests.conftest import REPO
from tests.vllm.shapes import TINY_SHAPE
from workloads.serving.params import ServingParams
from workloads.serving.systems.vllm import open_vllm_system

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240.0


def _attempt(config: VLLMServerConfig) -> tuple[str, float, list[int], str]:
    """Start a server that must fail: (error text, seconds it took, pids seen while it ran, its
    scratch folder)."""
    server = VLLMServer(config)
    seen: list[int] = []
    scratch: list[str] = []
    start = time.monotonic()
    original_wait = server._serves_our_model

    def watching(client):  # record the server's processes and scratch folder while it is starting
        seen.extend(p for p in server.pids() if p not in seen)
        scratch[:] = [server.scratch]
        return original_wait(client)

    server._serves_our_model = watching
    try:
        server.start()
    except VLLMStartupError as exc:
        return str(exc), time.monotonic() - start, seen, scratch[0]
    server.stop()
    raise AssertionError(f"vLLM started although it should not have: {config}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory):
    """Three bad starts at once: a model path that does not exist, a port taken, a KV cache too small."""
    tiny = dummy_folder(TINY_SHAPE, "float32")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    base = dict(load_format="dummy", max_num_seqs=4, max_model_len=512, block_size=32,
                startup_timeout_s=STARTUP_TIMEOUT_S)
    configs = {
        "bad_path": VLLMServerConfig(model_path=str(tmp_path_factory.mktemp("x") / "no-such-model"), **base),
        "port_taken": VLLMServerConfig(model_path=str(tiny.path), port=taken, kv_cache_bytes=8 << 20, **base),
        # One sequence of 512 tokens needs 512 KiB of KV here; give it 64 KiB.
        "kv_too_small": VLLMServerConfig(model_path=str(tiny.path), kv_cache_bytes=64 << 10, **base),
    }
    try:
        with ThreadPoolExecutor(len(configs)) as pool:
            futures = {name: pool.submit(_attempt, config) for name, config in configs.items()}
            yield {name: future.result() for name, future in futures.items()}
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad_path", "HFValidationError"),
        ("port_taken", "Address already in use"),
        ("kv_too_small", "KV cache is needed"),
    ],
)
def test_bad_start_fails_in_time_with_vllm_log_and_no_leftover(failures, case: str, expected: str) -> None:
    error, seconds, pids, scratch = failures[case]
    assert seconds < STARTUP_TIMEOUT_S
    assert "last lines of" in error and "exited with code" in error
    # vLLM's own words, pulled out of its log into the error.
    causes = error.split("vLLM's errors:", 1)[1].split("last lines of", 1)[0]
    assert expected in causes, error[-3000:]
    assert pids, "the server's processes were never seen"
    assert not [p for p in pids if _alive(p)]
    # The log the error names was kept, out of the scratch folder, which is gone.
    log = Path(error.split("last lines of ", 1)[1].split(":\n", 1)[0])
    assert expected in log.read_text() and not log.is_relative_to(scratch)
    assert not Path(scratch).exists()
    log.unlink()


def test_unknown_model_fails_the_trial_before_starting_anything(tmp_path: Path) -> None:
    params = ServingParams.model_validate({"model": str(tmp_path / "nothing-here"), "backend": "vllm",
                                           "transport": "http", "engine": {"block_size": 32}})
    with pytest.raises(ValueError, match="neither a preset"):
        open_vllm_system(params)


def test_block_size_vllm_cannot_use_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_SHAPE))
    params = ServingParams.model_validate({"model": str(tmp_path), "backend": "vllm", "transport": "http",
                                           "engine": {"block_size": 16}})
    with pytest.raises(ValueError, match="multiple of 32"):
        open_vllm_system(params)


def test_in_process_vllm_without_vllm_says_what_to_do(tmp_path: Path) -> None:
    # This (the main) environment has no vLLM.
    (tmp_path / "config.json").write_text(json.dumps(TINY_SHAPE))
    params = ServingParams.model_validate({"model": str(tmp_path), "backend": "vllm", "transport": "inprocess",
                                           "engine": {"block_size": 32}})
    with pytest.raises(ValueError, match="needs vLLM importable .* or use transport 'http'"):
        open_vllm_system(params)


def test_in_process_bad_starts_fail_in_time_with_vllm_log_and_no_leftover(tmp_path: Path) -> None:
    tiny = dummy_folder(TINY_SHAPE, "float32")
    run = subprocess.run(
        [str(REPO / ".venv-vllm" / "bin" / "python"), str(Path(__file__).with_name("inprocess_failures.py")),
         str(tiny.path), str(tmp_path / "no-such-model")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # One JSON line per case; vLLM may log to stdout while it shuts an engine down.
    results = {r["case"]: r for r in map(json.loads, (line for line in run.stdout.splitlines() if line.startswith("{")))}
    for case, expected in [("bad_path", "no-such-model"), ("kv_too_small", "KV cache is needed"),
                           ("timeout", "not ready within 4 s")]:
        result = results[case]
        assert result["error"] is not None and expected in result["error"], (case, result["error"])
        assert result["left"] == [], (case, result["left"])
        assert result["scratch_left"] == [], (case, result["scratch_left"])
        log = Path(result["error"].split("last lines of ", 1)[1].split(":\n", 1)[0])
        assert log.name.startswith("vllm-engine-") and log.exists(), result["error"]  # kept for its reader
        log.unlink()
    assert "vLLM's errors:" in results["kv_too_small"]["error"]  # the root cause, from the engine core's log
    assert results["timeout"]["seconds"] < 60
