"""Start and stop a real ``vllm serve`` (OpenAI-compatible) as a subprocess, with no orphans.

The server runs from another Python environment (``.venv-vllm``: vLLM pins its own torch), bound
to 127.0.0.1 on a free port. It is started through ``supervise.py`` as the leader of its own
process group, so stopping it ends vLLM's engine-core and worker processes too; the supervisor
also ends the group when this process dies (a trial actor killed with SIGKILL), and a
parent-death signal plus an ``atexit`` hook cover the remaining ways out. Start-up failures (bad
model path, port taken, KV cache too small, a crash) raise ``VLLMStartupError`` within the
start-up timeout, carrying the last lines of vLLM's log.

vLLM leaves files in the temp folder that outlive a killed engine (ZMQ IPC sockets, its
distributed-init file, multiprocessing's folders): four or so per start, thousands on a node
that runs a long grid. Each engine gets a scratch folder of its own for them instead, removed
when the engine is stopped, and by the supervisor (or the in-process reaper) when its owner dies.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends.network.ports import free_port
from backends.procs import group_pids

DEFAULT_PYTHON = ".venv-vllm/bin/python"
REPO_ROOT = Path(__file__).resolve().parents[3]
SUPERVISOR = Path(__file__).with_name("supervise.py")
SCRATCH_PREFIX = "orch-vllm-"
# vLLM names its IPC sockets <VLLM_RPC_BASE_PATH>/<uuid4>, and a Unix socket's path holds at most
# 107 bytes: the scratch folder's own path may take 107 - 37 of them.
SCRATCH_PATH_MAX = 107 - 1 - 36
LOG_TAIL_LINES = 40
# vLLM's CPU attention kernels take blocks of a multiple of this many tokens.
CPU_BLOCK_MULTIPLE = 32
_PR_SET_PDEATHSIG = 1


class VLLMStartupError(RuntimeError):
    """vLLM did not become ready; the message ends with the last lines of its log."""


@dataclass(frozen=True)
class VLLMServerConfig:
    """What ``vllm serve`` is started with."""

    model_path: str  # a HF folder (config.json + tokenizer [+ weights])
    served_model_name: str = "model"
    python: str = DEFAULT_PYTHON
    load_format: str = "auto"  # dummy: random weights
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    max_num_seqs: int = 32
    max_model_len: int | None = None
    block_size: int | None = None  # None: vLLM's own default for the device
    kv_cache_bytes: int | None = None  # exact KV budget (--kv-cache-memory-bytes)
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = False
    enforce_eager: bool = True  # skip torch.compile warm-up (minutes on a 2-core CPU)
    seed: int = 0
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. VLLM_CPU_KVCACHE_SPACE)
    log_path: str | None = None  # default: one in the engine's scratch folder (a failed start's is kept)

    def __post_init__(self) -> None:
        if self.device == "cpu" and self.block_size is not None and self.block_size % CPU_BLOCK_MULTIPLE:
            raise ValueError(
                f"vLLM on CPU needs engine.block_size to be a multiple of {CPU_BLOCK_MULTIPLE} "
                f"(its CPU attention kernels); got {self.block_size}"
            )
        if self.kv_cache_bytes is not None and self.gpu_memory_utilization is not None:
            raise ValueError("give engine.kv_cache_bytes or engine.gpu_memory_utilization, not both")


def resolve_python(python: str) -> Path:
    """The interpreter path: as given, else relative to the repo root (trial actors run elsewhere)."""
    path = Path(python).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def engine_flags(config: VLLMServerConfig) -> list[str]:
    """vLLM's engine arguments as command-line flags (model excluded): the one translation of our
    settings, used by ``vllm serve`` and, parsed by vLLM's own parser, by the in-process engine."""
    flags = [
        "--load-format", config.load_format,
        "--dtype", config.dtype,
        "--max-num-seqs", str(config.max_num_seqs),
        "--seed", str(config.seed),
        "--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if config.block_size is not None:
        flags += ["--block-size", str(config.block_size)]
    if config.max_model_len is not None:
        flags += ["--max-model-len", str(config.max_model_len)]
    if config.kv_cache_bytes is not None:
        flags += ["--kv-cache-memory-bytes", str(config.kv_cache_bytes)]
    if config.gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.enforce_eager:
        flags.append("--enforce-eager")
    return flags + list(config.extra_args)


def serve_command(config: VLLMServerConfig, port: int) -> list[str]:
    """The ``vllm serve`` command line (run by the vLLM environment's Python)."""
    return [
        str(resolve_python(config.python)), "-m", "vllm.entrypoints.cli.main", "serve", config.model_path,
        "--served-model-name", config.served_model_name,
        "--host", config.host,
        "--port", str(port),
        "--disable-uvicorn-access-log",
        *engine_flags(config),
    ]


# Settings for every vLLM process: loopback-only internal queues, no usage reports, no hub.
VLLM_SETTINGS = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def vllm_env() -> dict[str, str]:
    """Environment for a vLLM subprocess: ours minus this venv's, plus ``VLLM_SETTINGS``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(VLLM_SETTINGS, PYTHONUNBUFFERED="1")
    return env


def scratch_dir() -> str:
    """A fresh folder for one engine's temporary files, in the temp folder, or in /tmp where the
    temp folder's path is too long for vLLM's socket paths."""
    parent = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(parent, SCRATCH_PREFIX))) + 8 > SCRATCH_PATH_MAX:  # mkdtemp adds 8
        parent = "/tmp"
    return tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)


def scratch_env(folder: str) -> dict[str, str]:
    """Environment that puts vLLM's temporary files in ``folder``: its IPC sockets
    (``VLLM_RPC_BASE_PATH``) and whatever its processes create through ``tempfile``."""
    return {"TMPDIR": folder, "VLLM_RPC_BASE_PATH": folder}


def remove_scratch(folder: str | None) -> None:
    """Remove an engine's scratch folder (nothing when it is gone already)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def keep_log(path: str, prefix: str) -> str:
    """Move a failed start's log out of the scratch folder, which is removed; its new path."""
    fd, kept = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    try:
        shutil.move(path, kept)  # vLLM's processes may still write to it: the move keeps the file
    except OSError:
        return path
    return kept


def kv_env_overrides(config: VLLMServerConfig) -> list[str]:
    """Environment variables to drop because the config sizes the KV cache explicitly."""
    if config.kv_cache_bytes is not None or config.gpu_memory_utilization is not None:
        return ["VLLM_CPU_KVCACHE_SPACE"]  # it would override the explicit size
    return []


def serve_env(config: VLLMServerConfig, scratch: str) -> dict[str, str]:
    """The server's environment: ``vllm_env()``, its scratch folder, then the config's settings."""
    env = vllm_env()
    for name in kv_env_overrides(config):
        env.pop(name, None)
    env.update(scratch_env(scratch))
    env.update(config.env)
    return env


def _parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the thread that started us ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:\w+\.)*\w*(?:Error|Exception): .+")


def error_lines(path: str | Path, limit: int = 5) -> list[str]:
    """The last distinct exception lines (``ValueError: ...``) of a log: the root cause of a crash,
    which vLLM prints above tracebacks that push it out of the tail."""
    found: list[str] = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                match = _EXCEPTION_LINE.match(line.strip())
                if match and match.group(0) not in found:
                    found.append(match.group(0))
    except OSError:
        return []
    return found[-limit:]


class VLLMServer:
    """One running ``vllm serve``; ``start()`` blocks until it serves or raises."""

    def __init__(self, config: VLLMServerConfig):
        self.config = config
        self.port = config.port or free_port(config.host)
        self.base_url = f"http://{config.host}:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.scratch: str | None = None  # the running server's scratch folder
        self.log_path = config.log_path or ""  # our own log is made in the scratch folder by start()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """Pid of the supervisor (leader of the server's process group)."""
        return self._proc.pid if self._proc is not None else None

    def pids(self) -> list[int]:
        """Every live process of the server (supervisor, API server, engine core, workers)."""
        return group_pids(self._proc.pid) if self._proc is not None else []

    def start(self) -> VLLMServer:
        """Launch, and wait until ``/health`` answers and our model is listed (or raise)."""
        python = resolve_python(self.config.python)
        if not python.exists():
            raise VLLMStartupError(
                f"no Python at {self.config.python!r} for vLLM (backend.python); build it with `make vllm-env`"
            )
        self.scratch = scratch_dir()
        self.log_path = self.config.log_path or str(Path(self.scratch) / "vllm.log")
        self._log_file = open(self.log_path, "ab")
        on_main_thread = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            [str(python), str(SUPERVISOR), str(os.getpid()), "--remove", self.scratch, "--",
             *serve_command(self.config, self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=serve_env(self.config, self.scratch),
            start_new_session=True,  # own process group: one killpg ends vLLM's helpers too
            # The death signal follows the *thread* that forks: only safe from the main thread.
            preexec_fn=_parent_death_signal if on_main_thread else None,
        )
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._fail(f"vLLM exited with code {code} during start-up")
                if self._serves_our_model(client):
                    return
                if time.monotonic() > deadline:
                    self._fail(f"vLLM was not ready within {self.config.startup_timeout_s:g} s")
                time.sleep(0.5)

    def _serves_our_model(self, client: httpx.Client) -> bool:
        # /health alone could be answered by whatever else holds the port.
        try:
            if client.get(f"{self.base_url}/health").status_code != 200:
                return False
            models = client.get(f"{self.base_url}/v1/models").json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return False
        return any(m.get("id") == self.config.served_model_name for m in models)

    def _fail(self, why: str) -> None:
        if self.config.log_path is None:  # the error's reader gets the log, not a removed folder
            self.log_path = keep_log(self.log_path, "vllm-serve-")
        self.stop()
        causes = error_lines(self.log_path)
        cause = "vLLM's errors:\n" + "\n".join(causes) + "\n" if causes else ""
        raise VLLMStartupError(
            f"{why} (model {self.config.model_path}, {self.base_url}); {cause}last lines of {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and every process it started (idempotent)."""
        with self._lock:
            proc, self._proc = self._proc, None
            _LIVE.discard(self)
            if proc is not None:
                _stop_group(proc, timeout_s)
            # The supervisor removes it too, unless it was killed along with its group.
            remove_scratch(self.scratch)
            self.scratch = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server's log."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the supervisor (it ends the group), then SIGKILL whatever of the group is left."""
    pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5.0
    while group_pids(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass


_LIVE: set[VLLMServer] = set()


@atexit.register
def _stop_all() -> None:
    """Interpreter exit: stop servers that were not closed."""
    for server in list(_LIVE):
        server.stop(timeout_s=5.0)
