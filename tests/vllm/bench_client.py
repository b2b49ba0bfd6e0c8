"""Run vLLM's own load generator (``vllm bench serve``) against a server: a client nobody here wrote.

Used to cross-check our HTTP transport and metric code: the same server, the same workload
(random dataset with fixed input and output lengths, Poisson arrivals, ``--ignore-eos``, a fixed
seed), and the numbers must agree. ``bench_schedule`` turns vLLM's per-request results into a
trace (send offsets and lengths) that our load generator replays, and
``VLLMBench.run_alongside`` starts our replay the moment vLLM's client starts the same
schedule again (same seed), so each request has a twin sent at the same time by the other client
and both clients measure under the same server conditions.
"""

from __future__ import annotations

import json
import shutil
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


def bench_args(base_url: str, model: str, tokenizer: str, load: BenchLoad, result_dir: Path,
               result_file: str) -> list[str]:
    """The flags of ``vllm bench serve`` for ``load`` (what follows ``vllm bench serve`` on its command line)."""
    return [
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
WORKER = Path(__file__).with_name("bench_worker.py")


class VLLMBench:
    """vLLM's client in one process of vLLM's venv, run as often as asked (vLLM imports once).

    Each run is ``vllm bench serve`` with ``bench_args``: vLLM's own entry, in-process
    (tests/vllm/bench_worker.py). Use as a context manager; closing ends the process.
    """

    def __init__(self, python: str = DEFAULT_PYTHON, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self.folder = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
        self.runs = 0
        with open(self.folder / "worker.log", "wb") as sink:
            self.proc = subprocess.Popen([str(resolve_python(python)), "-u", str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=sink, stderr=subprocess.STDOUT, env=vllm_env())

    def __enter__(self) -> VLLMBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the process (its stdin closed, then killed if it lingers) and remove its files."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, base_url: str, model: str, tokenizer: str, load: BenchLoad) -> dict:
        """One run to completion: its saved results (JSON as a dict)."""
        return self.run_alongside(base_url, model, tokenizer, load, lambda: None)[0]

    def run_alongside(self, base_url: str, model: str, tokenizer: str, load: BenchLoad,
                      during: Callable[[], T]) -> tuple[dict, T]:
        """One run; ``during()`` is called the moment its measured run starts.

        Returns vLLM's saved results and what ``during`` returned. Running another client at the same
        time puts both under the same server conditions, whatever else the machine is doing.
        """
        self.runs += 1
        folder = self.folder / f"run{self.runs}"
        folder.mkdir()
        log, done = folder / "bench.log", folder / "done"
        log.touch()
        request = {"args": bench_args(base_url, model, tokenizer, load, folder, "result.json"), "log": str(log),
                   "done": str(done)}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout_s
        self._wait(lambda: START_LINE in log.read_bytes() or done.exists(), deadline, "start its measured run", log)
        if START_LINE not in log.read_bytes():
            raise RuntimeError(f"vllm bench serve ended before its measured run; last lines:\n{log_tail(log)}")
        value = during()
        self._wait(done.exists, deadline, "finish", log)
        result = folder / "result.json"
        code = done.read_text()
        if code != "0" or not result.exists():
            raise RuntimeError(f"vllm bench serve failed ({code}); last lines:\n{log_tail(log)}")
        return json.loads(result.read_text()), value

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str, log: Path) -> None:
        """Poll ``ready`` until it holds; fail if the process died or the deadline passed."""
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm bench serve's process exited with code {self.proc.returncode}; last lines:\n"
                                   f"{log_tail(log) or log_tail(self.folder / 'worker.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm bench serve did not {what} in time; last lines:\n{log_tail(log)}")
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
