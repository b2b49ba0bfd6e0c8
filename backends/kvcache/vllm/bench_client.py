"""Run vLLM's own load generator (``vllm bench serve``) against a server: a client nobody here wrote.

Used to cross-check our HTTP transport and metric code: the same server, the same workload
(random dataset with fixed input and output lengths, Poisson arrivals, ``--ignore-eos``, a fixed
seed), and the numbers must agree. ``bench_schedule`` turns vLLM's per-request results into a
trace (send offsets and lengths) that our load generator replays, so both clients send the same
requests at the same times.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backends.kvcache.vllm.server import DEFAULT_PYTHON, log_tail, resolve_python, vllm_env


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


def run_vllm_bench(base_url: str, model: str, tokenizer: str, load: BenchLoad,
                   python: str = DEFAULT_PYTHON, timeout_s: float = 600.0) -> dict:
    """Run ``vllm bench serve`` to completion and return its saved results (JSON as a dict)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        out = Path(tmp)
        log = out / "bench.log"
        cmd = bench_command(python, base_url, model, tokenizer, load, out, "result.json")
        with open(log, "wb") as sink:
            code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=vllm_env(), timeout=timeout_s,
                                  stdin=subprocess.DEVNULL).returncode
        result = out / "result.json"
        if code != 0 or not result.exists():
            raise RuntimeError(f"vllm bench serve failed with code {code}; last lines:\n{log_tail(log)}")
        return json.loads(result.read_text())


def bench_schedule(result: dict) -> list[dict]:
    """Trace lines (arrival_s, input_len, output_len) of the requests vLLM's client sent, in order."""
    starts = result["start_times"]
    t0 = min(starts)
    lines = [
        {"arrival_s": start - t0, "input_len": int(n_in), "output_len": int(n_out)}
        for start, n_in, n_out in zip(starts, result["input_lens"], result["output_lens"], strict=True)
    ]
    return sorted(lines, key=lambda line: line["arrival_s"])
