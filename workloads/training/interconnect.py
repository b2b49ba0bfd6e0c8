"""How a training trial's GPU workers reach each other: the grid's ``interconnect`` key.

NCCL picks its transport itself (NVLink / PCIe peer-to-peer, shared memory, InfiniBand, TCP
sockets); a study comparing compressors on a fast and a slow link on one host steers that
choice through NCCL's environment, set in every Ray Train worker before its process group
forms:
- ``auto``: NCCL's own choice (on an NVLink host: NVLink);
- ``nvlink``: peer-to-peer only between GPUs that NVLink joins (``NCCL_P2P_LEVEL=NVL``);
  elsewhere NCCL falls back to shared memory or sockets, which ``nccl_paths`` then shows;
- ``sockets``: peer-to-peer, shared memory and InfiniBand off, so every byte goes through
  TCP on the socket interface (loopback on one host): a slow, CPU-bound link.
NVLink multicast (NVLS) is always off: it needs fabric-manager multicast objects that shared
hosts often refuse. CPU workers talk over gloo's TCP sockets whatever this says, so
``sockets`` is what a CPU trial already is and ``nvlink`` is refused without ``use_gpu``.

``nccl_paths`` reads NCCL's INFO log (``NCCL_DEBUG_FILE``) for the transports its channels
actually used ("Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM"), so a trial records what NCCL did,
not only what it was asked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Interconnect = Literal["auto", "nvlink", "sockets"]

ALWAYS = {"NCCL_NVLS_ENABLE": "0"}
INTERCONNECT_ENV: dict[str, dict[str, str]] = {
    "auto": {},
    "nvlink": {"NCCL_P2P_LEVEL": "NVL"},
    "sockets": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1"},
}
# Every variable an interconnect sets: a worker reports these as it saw them (``nccl_env``).
NCCL_KEYS = tuple(sorted({*ALWAYS, *(k for env in INTERCONNECT_ENV.values() for k in env)}))
LOG_FOLDER = "nccl"  # under the trial's folder: one INFO log per worker process

_CHANNEL = re.compile(r"Channel \d+/\d+ : .*? via (\S+)")


def nccl_env(interconnect: Interconnect, log_dir: Path | None = None) -> dict[str, str]:
    """The environment a worker needs for ``interconnect``, plus NCCL's INFO log into ``log_dir``
    (only when the user has not chosen an NCCL_DEBUG level of their own)."""
    env = {**ALWAYS, **INTERCONNECT_ENV[interconnect]}
    if log_dir is not None and "NCCL_DEBUG" not in os.environ:
        env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_FILE=str(log_dir / "nccl.%h.%p.log"))
    return env


def apply_env(env: dict[str, str]) -> None:
    """Set ``env`` in this process, clearing the other interconnect variables a reused worker may hold."""
    for key in NCCL_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    log_file = env.get("NCCL_DEBUG_FILE")
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)


def seen_env() -> str:
    """This process's interconnect variables, ``KEY=value`` sorted and comma-joined ("" when none)."""
    return ",".join(f"{k}={os.environ[k]}" for k in NCCL_KEYS if k in os.environ)


def channel_paths(lines: Iterable[str]) -> set[str]:
    """Transports named by NCCL's channel-setup INFO lines, e.g. ``P2P/CUMEM``, ``SHM/direct``, ``NET/Socket``
    (the first two parts of the name; numbers and read/write suffixes dropped)."""
    paths = set()
    for line in lines:
        match = _CHANNEL.search(line)
        if match:
            parts = [p for p in match.group(1).split("/") if p and not p.isdigit()]
            paths.add("/".join(parts[:2]))
    return paths


def nccl_paths(log_dir: Path) -> str | None:
    """Comma-joined transports NCCL's channels used, from the workers' logs in ``log_dir``; None without logs."""
    files = sorted(log_dir.glob("nccl.*.log")) if log_dir.is_dir() else []
    if not files:
        return None
    paths: set[str] = set()
    for file in files:
        paths |= channel_paths(file.read_text(errors="replace").splitlines())
    return ",".join(sorted(paths))
