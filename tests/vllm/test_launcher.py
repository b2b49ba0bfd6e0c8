"""The vLLM launcher without vLLM: command lines, model folders, failures and orphan clean-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from backends.kvcache.vllm.model_folder import complete_hf_config, dummy_folder, kv_bytes_per_token
from backends.kvcache.vllm.server import (
    SCRATCH_PREFIX,
    SUPERVISOR,
    VLLMServer,
    VLLMServerConfig,
    VLLMStartupError,
    remove_scratch,
    scratch_dir,
    serve_command,
)
from backends.procs import group_pids, read_stat
from tests.vllm.shapes import TINY_SHAPE


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not [p for p in pids if _alive(p)]:
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.alive


def test_command_carries_the_engine_settings() -> None:
    config = VLLMServerConfig(model_path="/m", python="/py", load_format="dummy", max_num_seqs=4,
                              max_model_len=256, block_size=64, kv_cache_bytes=1 << 26)
    cmd = serve_command(config, 1234)
    assert cmd[:5] == ["/py", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    pairs = dict(zip(cmd[5::1], cmd[6::1], strict=False))
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "1234"
    assert pairs["--max-num-seqs"] == "4" and pairs["--max-model-len"] == "256" and pairs["--block-size"] == "64"
    assert pairs["--kv-cache-memory-bytes"] == str(1 << 26) and pairs["--load-format"] == "dummy"
    assert "--no-enable-prefix-caching" in cmd and "--enforce-eager" in cmd


def test_cpu_block_size_must_suit_vllm_kernels() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        VLLMServerConfig(model_path="/m", block_size=16)
    with pytest.raises(ValueError, match="not both"):
        VLLMServerConfig(model_path="/m", kv_cache_bytes=1, gpu_memory_utilization=0.5)


def test_dummy_folder_has_config_and_a_round_tripping_tokenizer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORCH_CACHE", str(tmp_path))
    from transformers import AutoTokenizer

    folder = dummy_folder(TINY_SHAPE, "float32")
    config = json.loads((folder.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert folder.load_format == "dummy"
    tokenizer = AutoTokenizer.from_pretrained(str(folder.path))
    assert len(tokenizer) == TINY_SHAPE["vocab_size"]
    ids = [5, 9, 300, 511]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    assert dummy_folder(TINY_SHAPE, "float32").path == folder.path  # cached by content
    # 2 x layers x kv_heads x head_dim x 4 bytes
    assert folder.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert kv_bytes_per_token(TINY_SHAPE, "bfloat16") == folder.kv_bytes_per_token // 2


def test_opt_shapes_get_the_opt_architecture() -> None:
    from backends.kvcache.presets import PRESETS

    assert complete_hf_config(PRESETS["opt-125m"], "float32")["architectures"] == ["OPTForCausalLM"]
    with pytest.raises(ValueError, match="not supported"):
        complete_hf_config({"model_type": "gpt2"}, "float32")


def test_missing_python_fails_at_once() -> None:
    server = VLLMServer(VLLMServerConfig(model_path="/m", python="/nowhere/bin/python"))
    with pytest.raises(VLLMStartupError, match="make vllm-env"):
        server.start()


def test_a_server_that_dies_during_startup_fails_with_its_log_and_leaves_nothing() -> None:
    # The main environment has no vLLM: the process exits at once with an import error.
    server = VLLMServer(VLLMServerConfig(model_path="/m", python=sys.executable, startup_timeout_s=60))
    start = time.monotonic()
    with pytest.raises(VLLMStartupError) as failure:
        server.start()
    assert time.monotonic() - start < 30
    assert "exited with code" in str(failure.value) and "No module named" in str(failure.value)
    assert server.pids() == []
    log = Path(server.log_path)  # kept for the error's reader; the scratch folder is gone
    assert log.name.startswith("vllm-serve-") and "No module named" in log.read_text()
    assert not log.parent.name.startswith(SCRATCH_PREFIX)
    log.unlink()


def _start_supervised(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """A starter process that supervises `sh` with a grandchild, then waits; returns (starter,
    group, the scratch folder the supervisor is to remove, with a file in it)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "left-by-vllm").write_text("")
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time, os
        proc = subprocess.Popen([sys.executable, {str(SUPERVISOR)!r}, str(os.getpid()), "--remove", {str(scratch)!r},
                                 "--", "/bin/sh", "-c", "sleep 300 & sleep 300"], start_new_session=True)
        print(proc.pid, flush=True)
        time.sleep(300)
    """))
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    group = int(starter.stdout.readline())
    deadline = time.monotonic() + 10
    while len(group_pids(group)) < 3 and time.monotonic() < deadline:  # supervisor, sh, sleep
        time.sleep(0.05)
    return starter, group, scratch


def test_killing_the_starter_ends_the_whole_server_group(tmp_path: Path) -> None:
    starter, group, scratch = _start_supervised(tmp_path)
    pids = group_pids(group)
    assert len(pids) >= 3
    os.kill(starter.pid, signal.SIGKILL)  # a trial actor killed without any clean-up
    starter.wait()
    assert _gone(pids, within_s=15), f"left behind: {[p for p in pids if _alive(p)]}"
    assert not scratch.exists()  # the starter cannot remove it: the supervisor did, its last act


def test_terminating_the_supervisor_ends_its_children(tmp_path: Path) -> None:
    starter, group, scratch = _start_supervised(tmp_path)
    pids = group_pids(group)
    assert scratch.exists()
    os.kill(group, signal.SIGTERM)
    try:
        assert _gone(pids, within_s=15)
        assert scratch.exists()  # the starter, alive, removes it (after keeping what it wants)
    finally:
        starter.kill()
        starter.wait()


@pytest.mark.parametrize("tmpdir_length", [20, 120])
def test_vllm_can_bind_its_sockets_in_the_scratch_folder_under_any_temp_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpdir_length: int) -> None:
    # vLLM binds <scratch>/<uuid4> sockets; a long $TMPDIR (a cluster's per-job folder) would make
    # that path longer than a Unix socket allows, so the folder then goes to /tmp.
    temp = Path("/tmp") / ("t" * (tmpdir_length - len("/tmp/")))
    temp.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    folder = scratch_dir()
    try:
        assert Path(folder).parent == (temp if tmpdir_length < 50 else Path("/tmp"))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(f"{folder}/{uuid.uuid4()}")
    finally:
        remove_scratch(folder)
        temp.rmdir()
    assert not Path(folder).exists()
