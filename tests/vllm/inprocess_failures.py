"""Run by ``.venv-vllm``'s Python (it has vLLM): bad starts of the in-process engine, one JSON
line per case with the error, the seconds it took, and the processes and scratch folders it left
behind."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from multiprocessing import resource_tracker
from pathlib import Path

from backends.kvcache.vllm.async_engine import AsyncEngineHost
from backends.kvcache.vllm.server import SCRATCH_PREFIX, VLLMServerConfig, VLLMStartupError
from backends.procs import descendants


def _leftovers(before: set[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while True:
        left = [d.pid for d in descendants(os.getpid()) if d.pid not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _scratch_folders() -> set[str]:
    return {str(p) for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*")}


def _scratch_left(before: set[str], within_s: float) -> list[str]:
    """Scratch folders made since ``before`` that are still there (the reaper removes them last)."""
    deadline = time.monotonic() + within_s
    while True:
        left = sorted(_scratch_folders() - before)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def main(tiny: str, missing: str) -> None:
    # Blocks of 32 tokens: one 512-token sequence needs 16 of them; the KV cases size the cache around that.
    base = dict(load_format="dummy", max_num_seqs=4, max_model_len=512, block_size=32, startup_timeout_s=240.0)
    cases = {
        "bad_path": VLLMServerConfig(model_path=missing, **base),
        "kv_too_small": VLLMServerConfig(model_path=tiny, **{**base, "kv_cache_bytes": 64 << 10}),
        "timeout": VLLMServerConfig(model_path=tiny, **{**base, "kv_cache_bytes": 8 << 20, "startup_timeout_s": 4.0}),
    }
    resource_tracker.ensure_running()  # lives as long as this process, like in a trial actor
    before = {d.pid for d in descendants(os.getpid())}
    for name, config in cases.items():
        folders = _scratch_folders()
        start = time.monotonic()
        try:
            AsyncEngineHost(config, kv_bytes_per_token=1024).close()
            error = None
        except VLLMStartupError as exc:
            error = str(exc)
        seconds = time.monotonic() - start
        print(json.dumps({"case": name, "error": error, "seconds": seconds,
                          "left": _leftovers(before, within_s=20),
                          "scratch_left": _scratch_left(folders, within_s=20)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
