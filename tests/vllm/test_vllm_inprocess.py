"""vLLM in the trial's own process (``AsyncLLM``), run by ``orch submit`` from ``.venv-vllm``, the
environment that has both vLLM and orch (as a GPU node with vLLM installed next to orch would).

Checked: ``transport: auto`` picks the in-process engine when vLLM imports; one ``engine_steps``
row per engine iteration; and a trial actor killed with
SIGKILL mid-load leaves none of vLLM's processes and none of its temporary files behind, and a
cancelled submit nothing at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from backends.procs import all_stats, read_stat
from orchestrator.store import ExperimentStore
from tests.conftest import REPO
from tests.vllm.shapes import TINY_SHAPE

pytestmark = pytest.mark.slow

ORCH = REPO / ".venv-vllm" / "bin" / "orch"
TAG = "ORCH_TEST_TAG"
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 KV heads x head_dim 32 x float32


def _grid(tmp_path: Path, experiment: str, load: dict, **extra: object) -> Path:
    model = tmp_path / "tiny-llama32"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_SHAPE))
    grid = tmp_path / f"{experiment}.yaml"
    grid.write_text(yaml.safe_dump({
        "experiment": experiment,
        "kind": "serving",
        "base": {
            "model": str(model),
            "backend": {"name": "vllm", "startup_timeout_s": 300},
            "engine": {"block_size": 32, "max_num_seqs": 8, "max_model_len": 512, "kv_cache_bytes": 16 << 20},
            "load": load,
        },
        "resources": {"num_cpus": 1},
        "retries": 0,
        **extra,
    }))
    return grid


def _submit(grid: Path, results: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, TAG: tag, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.Popen(
        [str(ORCH), "submit", str(grid), "--results", str(results), "--no-dashboard"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _tagged(tag: str) -> list[int]:
    """Live processes that carry the tag in their environment (the submit and all it started)."""
    found = []
    for stat in all_stats():
        try:
            with open(f"/proc/{stat.pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if stat.alive and f"{TAG}={tag}".encode() in environ.split(b"\0"):
            found.append(stat.pid)
    return found


def _environ(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_auto_runs_vllm_in_process(tmp_path: Path) -> None:
    grid = _grid(tmp_path, "vllm-inprocess",
                 {"num_requests": 12, "input_len": 48, "output_len": 24, "seed": 3},
                 grid={"load.request_rate": [6.0, 24.0]}, timeout_s=600)
    results = tmp_path / "results"
    submit = _submit(grid, results, uuid.uuid4().hex)
    out, _ = submit.communicate(timeout=900)
    assert submit.returncode == 0, out[-4000:]
    store = ExperimentStore(results, "vllm-inprocess")
    assert sorted(e["state"] for e in store.load_manifest()["trials"].values()) == ["done", "done"]
    summary = store.read_table("serving_summary").to_pandas()
    assert list(summary["transport"]) == ["inprocess", "inprocess"]
    assert list(summary["backend"]) == ["vllm", "vllm"]
    assert list(summary["completed"]) == [12, 12] and list(summary["total_output_tokens"]) == [12 * 24] * 2
    # Greedy, forced lengths, 12 requests of 24 tokens: one engine iteration per decode step at
    # least, so at least 24 rows; the in-process engine is not sampled at intervals.
    assert (summary["engine_steps"] >= 24).all()
    steps = store.read_table("engine_steps").to_pandas()
    used = steps[steps["kv_blocks_used"] > 0]
    assert len(used) and (used["kv_bytes_device"] == used["kv_blocks_used"] * 32 * KV_BYTES_PER_TOKEN).all()
    assert steps["running"].max() >= 2
    requests = store.read_table("requests").to_pandas()
    assert len(requests) == 24 and requests["error"].isna().all() and (requests["output_tokens"] == 24).all()
    assert (summary["ttft_ms_median"] > 0).all() and (summary["tpot_ms_median"] > 0).all()


def _wait_for_engine_core(tag: str, submit: subprocess.Popen, exclude: set[int], within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and submit.poll() is None:
        for pid in _tagged(tag):
            if pid not in exclude and _cmdline(pid).startswith("VLLM::EngineCore"):
                return pid
        time.sleep(0.5)
    ended = "" if submit.poll() is None else f"; the submit ended ({submit.returncode}):\n{submit.communicate()[0][-4000:]}"
    raise AssertionError(f"vLLM's engine core did not start{ended}")


def _wait_for_engine_ready(log: Path, submit: subprocess.Popen, within_s: float) -> None:
    """Until the engine core's log (in its scratch folder) says its start-up is done."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and submit.poll() is None:
        if log.exists() and "init engine (profile, create kv cache, warmup model) took" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"vLLM's engine did not finish its start-up; its log:\n{tail}")


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if (stat := read_stat(p)) is not None and stat.alive]


def test_a_killed_trial_actor_leaves_no_vllm_process(tmp_path: Path) -> None:
    # A load far longer than the test waits: the actor is killed while vLLM is generating. The
    # retry keeps the submit (and its Ray) running: vLLM's processes must end while it does, not
    # at its exit. (Ray 2.60 ends a dead worker's process group; the reaper covers hosts where
    # that is off and engines run outside Ray: tests/vllm/test_reaper.py.)
    grid = _grid(tmp_path, "vllm-killed",
                 {"num_requests": 400, "request_rate": "inf", "input_len": 48, "output_len": 400},
                 retries=1, timeout_s=900)
    results = tmp_path / "results"
    tag = uuid.uuid4().hex
    submit = _submit(grid, results, tag)
    try:
        first = _wait_for_engine_core(tag, submit, set(), within_s=300)
        scratch = Path(_environ(first)["TMPDIR"])
        _wait_for_engine_ready(scratch / "vllm.log", submit, within_s=300)
        time.sleep(2)  # the load running: every request is sent at once
        actor = read_stat(first).ppid
        assert "TrialRunner" in _cmdline(actor)
        vllm_pids = [p for p in _tagged(tag) if _cmdline(p).startswith("VLLM::")]
        assert len(vllm_pids) >= 2  # engine core and its CPU worker
        assert scratch.name.startswith("orch-vllm-") and any(scratch.iterdir())  # vLLM's files are there
        os.kill(actor, signal.SIGKILL)  # no clean-up in the actor can run
        deadline = time.monotonic() + 20
        while (_alive(vllm_pids) or scratch.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(vllm_pids) == [], [_cmdline(p) for p in _alive(vllm_pids)]
        assert not scratch.exists()  # the reaper removed it
        assert submit.poll() is None  # ended while Ray and the submit ran on, not by their exit
        # The retry starts a fresh engine; cancelling the submit then ends everything it started.
        retry = _wait_for_engine_core(tag, submit, set(vllm_pids), within_s=300)
        retry_scratch = Path(_environ(retry)["TMPDIR"])
        submit.send_signal(signal.SIGTERM)
        out, _ = submit.communicate(timeout=300)
        manifest = ExperimentStore(results, "vllm-killed").load_manifest()
        (entry,) = manifest["trials"].values()
        assert entry["state"] == "cancelled" and entry["attempts"] == 2, out[-3000:]
        deadline = time.monotonic() + 30
        while _tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _tagged(tag) == [], [_cmdline(p) for p in _tagged(tag)]
        assert retry_scratch != scratch and not retry_scratch.exists()
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)
