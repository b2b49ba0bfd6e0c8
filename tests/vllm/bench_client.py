"""Run vLLM's own load generator (``vllm bench serve``) against a server: a client nobody here wrote.

Used to cross-check our HTTP transport and metric code: the same server, the same workload
(random dataset with fixed input and output lengths, Poisson arrivals, ``--ignore-eos``, a fixed
seed), and the numbers must agree. ``bench_schedule`` turns vLLM's per-request results into a
trace (send offsets and lengths) that our load generator replays, and
``run_vllm_bench_alongside`` starts our replay the moment vLLM's client starts the same
schedule again (same seed), so each request has a twin sent at the same time by the other client
and both clients measure under the same server conditions.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from backends.kvcache.vllm.server import DEFAULT_PYTHON, log_tail, resolve_python, vllm_env

T = TypeVar("T")


@dataclass(frozen=True)
class BenchLoad:
    """The workload both clients run."""

    num_prompts: int = 40
    input_len: int = 64
    output_len: int = 16
    request_rate: float = 4.0
    seed: int = 0


def bench_command(python: str, base_url: str, model: str, tokenizer: str, load: BenchLoad,
                  result_dir: Path, result_file: str) -> list[str]:
    """The ``vllm bench serve`` command line."""
    return [
        str(resolve_python(python)), "-m", "vllm.entrypoints.cli.main", "bench", "serve",
        "--backend", "vllm",
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", model,
        "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(load.input_len),
        "--random-output-len", str(load.output_len),
        "--random-range-ratio", "0",
        "--num-prompts", str(load.num_prompts),
        "--request-rate", str(load.request_rate),
        "--burstiness", "1.0",
        "--ignore-eos",
        "--temperature", "0",
        "--seed", str(load.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed",
        "--result-dir", str(result_dir),
        "--result-filename", result_file,
        "--disable-tqdm",
    ]


# vLLM's client prints this right before it sends the first request of the measured run.
START_LINE = b"Starting main benchmark run"


def run_vllm_bench(base_url: str, model: str, tokenizer: str, load: BenchLoad,
                   python: str = DEFAULT_PYTHON, timeout_s: float = 600.0) -> dict:
    """Run ``vllm bench serve`` to completion and return its saved results (JSON as a dict)."""
    return run_vllm_bench_alongside(base_url, model, tokenizer, load, lambda: None, python, timeout_s)[0]


def run_vllm_bench_alongside(base_url: str, model: str, tokenizer: str, load: BenchLoad,
                             during: Callable[[], T], python: str = DEFAULT_PYTHON,
                             timeout_s: float = 600.0) -> tuple[dict, T]:
    """Run ``vllm bench serve`` and call ``during()`` the moment its measured run starts.

    Returns vLLM's saved results and what ``during`` returned. Running another client at the same
    time puts both under the same server conditions, whatever else the machine is doing.
    """
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        out = Path(tmp)
        log = out / "bench.log"
        cmd = bench_command(python, base_url, model, tokenizer, load, out, "result.json")
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=vllm_env(),
                                    stdin=subprocess.DEVNULL)
            try:
                _wait_for_start(proc, log, time.monotonic() + timeout_s)
                value = during()
                code = proc.wait(timeout=timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        result = out / "result.json"
        if code != 0 or not result.exists():
            raise RuntimeError(f"vllm bench serve failed with code {code}; last lines:\n{log_tail(log)}")
        return json.loads(result.read_text()), value


def _wait_for_start(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll the client's log until it starts its measured run (or fails)."""
    while START_LINE not in log.read_bytes():
        if proc.poll() is not None:
            raise RuntimeError(f"vllm bench serve exited with code {proc.returncode}; last lines:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"vllm bench serve did not start in time; last lines:\n{log_tail(log)}")
        time.sleep(0.005)


def bench_schedule(result: dict) -> list[dict]:
    """Trace lines (arrival_s, input_len, output_len) of the requests vLLM's client sent, in order."""
    starts = result["start_times"]
    t0 = min(starts)
    lines = [
        {"arrival_s": start - t0, "input_len": int(n_in), "output_len": int(n_out)}
        for start, n_in, n_out in zip(starts, result["input_lens"], result["output_lens"], strict=True)
    ]
    return sorted(lines, key=lambda line: line["arrival_s"])
