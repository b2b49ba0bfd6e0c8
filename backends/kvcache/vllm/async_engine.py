"""vLLM's own async engine (``AsyncLLM``) inside the trial's process: the in-process vLLM backend.

Used when ``vllm`` imports in the trial's environment (a GPU node with vLLM installed next to
orch, or ``.venv-vllm``, which has both). The engine lives on an event loop of its own thread;
the load generator (workloads/serving) submits requests to it through ``stream`` and stamps each
streamed output as it arrives, without HTTP in between. vLLM's engine arguments are the same flags
``vllm serve`` gets (``server.engine_flags``, parsed by vLLM's parser), so both paths run one
engine configuration. Engine-side rows come from a vLLM stat logger: one row per engine
iteration, not a sampled ``/metrics``.

vLLM runs its engine core (and on CPU a worker) as child processes. They are covered by a
``Reaper`` (killed if this process dies without clean-up), their temporary files go to a scratch
folder the reaper removes, their output goes to a log file whose last lines a start-up failure
reports, and start-up is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import contextmanager
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from backends.kvcache.vllm.reaper import Reaper
from backends.kvcache.vllm.server import (
    VLLM_SETTINGS,
    VLLMServerConfig,
    VLLMStartupError,
    engine_flags,
    error_lines,
    keep_log,
    kv_env_overrides,
    log_tail,
    scratch_dir,
    scratch_env,
)
from backends.procs import descendants


def engine_args(config: VLLMServerConfig) -> AsyncEngineArgs:
    """The engine arguments ``vllm serve`` would build from the same settings."""
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    try:
        namespace = parser.parse_args(["--model", config.model_path, *engine_flags(config)])
    except SystemExit:  # argparse already printed which flag; say it in the trial's error too
        raise ValueError(f"vLLM rejected the engine arguments {engine_flags(config)} "
                         "(backend.extra_args holds engine flags only in process)") from None
    return AsyncEngineArgs.from_cli_args(namespace)


class StepRecorder:
    """Turns vLLM's per-iteration scheduler stats into ``engine_steps`` rows while a load runs."""

    def __init__(self, kv_bytes_per_token: int):
        self.kv_bytes_per_token = kv_bytes_per_token
        self.num_blocks = 0
        self.block_size = 0
        self.rows: list[dict] = []
        self._t0: float | None = None
        self._preemptions_total = 0

    def start(self, t0: float) -> None:
        """Record from now on; ``t_s`` of each row is seconds after ``t0``."""
        self.rows, self._t0, self._preemptions_total = [], t0, 0

    def stop(self) -> list[dict]:
        """Stop recording; the rows since ``start``."""
        self._t0 = None
        return list(self.rows)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """One engine iteration (called by the stat logger on the engine's event loop)."""
        if self._t0 is None or scheduler_stats is None:
            return
        preempted = iteration_stats.num_preempted_reqs if iteration_stats is not None else 0
        self._preemptions_total += preempted
        blocks = int(round(scheduler_stats.kv_cache_usage * self.num_blocks))
        self.rows.append({
            "step": len(self.rows),
            "t_s": time.perf_counter() - self._t0,
            "running": scheduler_stats.num_running_reqs,
            "waiting": scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
            "kv_blocks_used": blocks,
            "kv_bytes_device": blocks * self.block_size * self.kv_bytes_per_token,
            "kv_bytes_host": 0,  # vLLM keeps its cache on the device
            "h2d_bytes": 0,
            "preemptions": preempted,
            "h2d_bytes_total": 0,
            "preemptions_total": self._preemptions_total,
        })

    def logger_factory(self) -> Any:
        """A vLLM stat-logger factory that feeds this recorder."""
        recorder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                recorder.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


@contextmanager
def _output_to(log_path: str):
    """Send this process's stdout/stderr (fds 1 and 2) to a log file; children started meanwhile
    keep writing there for their lifetime, which is how vLLM's engine-core log is kept."""
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class AsyncEngineHost:
    """One ``AsyncLLM`` on its own event-loop thread, started within a timeout, stopped cleanly."""

    def __init__(self, config: VLLMServerConfig, kv_bytes_per_token: int):
        self.config = config
        self.recorder = StepRecorder(kv_bytes_per_token)
        self.engine: AsyncLLM | None = None
        self._configure_environment(config)
        args = engine_args(config)  # bad flags fail here, before any process starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async-engine", daemon=True)
        self._thread.start()
        # multiprocessing's resource tracker lives as long as this process and is shared by later
        # engines here: start it before the reaper, which then leaves it alone (and before the
        # scratch folder, which it would outlive).
        resource_tracker.ensure_running()
        scratch = scratch_dir()
        self.log_path = config.log_path or str(Path(scratch) / "vllm.log")
        self._saved_env = {name: os.environ.get(name) for name in scratch_env(scratch)}
        os.environ.update(scratch_env(scratch))  # vLLM's processes inherit it; restored on close
        self._reaper = Reaper.start(remove=scratch)
        self._before = {(d.pid, d.start_ticks) for d in descendants(os.getpid())}
        try:
            self._start(args)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _configure_environment(config: VLLMServerConfig) -> None:
        # vLLM reads its settings from the environment of the process that hosts it (and passes
        # them to its engine core): loopback only, no usage reports, no hub.
        os.environ.update(VLLM_SETTINGS)
        for name in kv_env_overrides(config):
            os.environ.pop(name, None)
        os.environ.update(config.env)

    def _start(self, args: AsyncEngineArgs) -> None:
        async def create() -> AsyncLLM:
            # Created on the loop so that vLLM's output handler runs on it.
            return AsyncLLM.from_engine_args(args, stat_loggers=[self.recorder.logger_factory()])

        timeout = self.config.startup_timeout_s
        try:
            with _output_to(self.log_path):
                future = asyncio.run_coroutine_threadsafe(create(), self._loop)
                try:
                    self.engine = future.result(timeout)
                except TimeoutError:
                    self._reaper.kill_covered()  # its engine core: the constructor then fails fast
                    raise VLLMStartupError(
                        self._failure(f"vLLM's engine was not ready within {timeout:g} s")) from None
        except VLLMStartupError:
            raise
        except Exception as exc:  # vLLM prints the root cause in its engine core's log
            raise VLLMStartupError(
                self._failure(f"vLLM's engine failed to start: {type(exc).__name__}: {exc}")) from exc
        cache = self.engine.vllm_config.cache_config
        self.recorder.num_blocks, self.recorder.block_size = int(cache.num_gpu_blocks or 0), int(cache.block_size)

    def _failure(self, why: str) -> str:
        if self.config.log_path is None:  # the error's reader gets the log, not a removed folder
            self.log_path = keep_log(self.log_path, "vllm-engine-")
        causes = error_lines(self.log_path)
        cause = "vLLM's errors:\n" + "\n".join(causes) + "\n" if causes else ""
        return (f"{why} (model {self.config.model_path}); {cause}last lines of {self.log_path}:\n"
                f"{log_tail(self.log_path)}")

    def call(self, coroutine: Coroutine) -> Any:
        """Run a coroutine on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def stream(self, prompt_token_ids: list[int], prompt_text: str | None, max_tokens: int,
                     ignore_eos: bool, request_id: str) -> AsyncIterator[tuple[list[int], int | None]]:
        """Generate greedily (on the engine's loop); yields (new token ids, prompt tokens or None)
        for each engine output: DELTA outputs, so one output is one arrival (like one streamed
        chunk over HTTP)."""
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos,
                                  output_kind=RequestOutputKind.DELTA)
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids) if prompt_token_ids else prompt_text
        unique_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        async for output in self.engine.generate(prompt, sampling, request_id=unique_id):
            new_tokens = list(output.outputs[0].token_ids) if output.outputs else []
            prompt_tokens = len(output.prompt_token_ids) if output.prompt_token_ids is not None else None
            yield new_tokens, prompt_tokens

    def pids(self) -> list[int]:
        """Live processes this host started (vLLM's engine core and workers)."""
        return [d.pid for d in descendants(os.getpid()) if (d.pid, d.start_ticks) not in self._before]

    def close(self) -> None:
        """Shut the engine down, stop the loop, and have the reaper end any leftover (idempotent)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            async def shutdown() -> None:
                engine.shutdown()

            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(60)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._reaper.close()  # it removes the scratch folder once vLLM's processes are gone
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
